"""A checkpoint file as a lazy state dict: each tensor is read from the file when it is asked for.

MergeMany visits N models many times; holding them all would make memory grow with N. A
`FileStateDict` holds only the file's checked header: `sd[key]` reads that one tensor from its byte
range (`Checkpoint.iter_tensors`) into a fresh buffer that belongs to the caller. It does not memory-map the file: pages
of a mapping stay counted in the process's resident memory while it is open, so N open mappings
read through once would cost N files of RSS; the page cache keeps a re-read fast either way.
Legacy pickles are loaded once (memory-mapped when in the zip format) and cloned on access.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from .checkpoint import Checkpoint


class FileStateDict(Mapping[str, torch.Tensor]):
    """`{key: tensor}` of one checkpoint, keys in the config's names (aliases resolved), read on access.

    Every access reads the tensor again and returns a new tensor the caller may modify in place
    (`fresh_tensors` tells `merge_many` so). Safe to read from several threads.
    """

    fresh_tensors = True

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._file_key = {ckpt.canonical.get(k, k): k for k in ckpt.shapes}

    def __getitem__(self, key: str) -> torch.Tensor:
        """The tensor, read from its byte range or dequantized (`Checkpoint.iter_tensors`); a pickle's is cloned."""
        ((_, tensor),) = self.ckpt.iter_tensors([self._file_key[key]])
        return tensor.clone() if self.ckpt.kind == "pickle" else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_key)

    def __len__(self) -> int:
        return len(self._file_key)

    def __contains__(self, key: object) -> bool:
        return key in self._file_key

    def shape(self, key: str) -> tuple[int, ...]:
        return self.ckpt.shapes[self._file_key[key]]

    def dtype(self, key: str) -> torch.dtype:
        return self.ckpt.dtypes[self._file_key[key]]


def open_lazy(models: list[Checkpoint]) -> list[FileStateDict]:
    """One `FileStateDict` per checkpoint (nothing read yet but the headers)."""
    return [FileStateDict(c) for c in models]
