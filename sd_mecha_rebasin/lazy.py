"""A checkpoint file as a lazy state dict: each tensor is read from the file when it is asked for.

MergeMany visits N models many times; holding them all would make memory grow with N. A
`FileStateDict` holds only the file's header: `sd[key]` reads that one tensor with a positioned read
(a seek and a read) into a fresh buffer that belongs to the caller. It does not memory-map the file: pages
of a mapping stay counted in the process's resident memory while it is open, so N open mappings
read through once would cost N files of RSS; the page cache keeps a re-read fast either way.
Legacy pickles are loaded once (memory-mapped when in the zip format) and cloned on access.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from .checkpoint import Checkpoint, _safetensors_header, load_pickle


class FileStateDict(Mapping[str, torch.Tensor]):
    """`{key: tensor}` of one checkpoint, keys in the config's names (aliases resolved), read on access.

    Every access reads the tensor again and returns a new tensor the caller may modify in place
    (`fresh_tensors` tells `merge_many` so). Safe to read from several threads.
    """

    fresh_tensors = True

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._file_key = {ckpt.canonical.get(k, k): k for k in ckpt.shapes}
        self._offsets: dict[str, tuple[int, int]] = {}
        if ckpt.kind == "safetensors":
            header, data_start, _ = _safetensors_header(ckpt.path)
            header.pop("__metadata__", None)
            self._offsets = {
                key: (data_start + int(info["data_offsets"][0]), data_start + int(info["data_offsets"][1]))
                for key, info in header.items()
            }

    def __getitem__(self, key: str) -> torch.Tensor:
        file_key = self._file_key[key]
        if self.ckpt.kind != "safetensors":
            return load_pickle(self.ckpt.path)[file_key].clone()
        begin, end = self._offsets[file_key]
        buffer = bytearray(end - begin)
        with open(self.ckpt.path, "rb", buffering=0) as f:  # one handle per read: thread-safe
            f.seek(begin)
            view, done = memoryview(buffer), 0
            while done < len(buffer):  # a raw read may return less than asked for
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{self.ckpt.path}: unexpected end of file reading {file_key}")
                done += n
        dtype = self.ckpt.dtypes[file_key]
        shape = self.ckpt.shapes[file_key]
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

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
