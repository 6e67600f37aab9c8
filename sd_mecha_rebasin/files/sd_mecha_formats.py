"""What teaches sd-mecha to read the files this package reads, in one place.

sd-mecha reads a model through a "model format" (`sd_mecha.extensions.model_formats`) whose
`get_read_dict` returns a `SafetensorsMapping`. `register()` makes sd-mecha read, as our own
reader (`checkpoint.open_checkpoint`) does:

- legacy `.ckpt` / `.pt` / `.pth` pickles (through `checkpoint.load_pickle`), so sd-mecha streams
  them like safetensors and recipes name the real file;
- GGUF UNets and fp8 scaled safetensors, dequantized (`quantized`); bitsandbytes / NVFP4 files
  are refused (UserError) by wrapping sd-mecha's builtin `single_file` format (a `.safetensors`
  file may match one format only);
- other tools' key layouts as canonical (`key_layouts`), by wrapping every registered format.

Every reader is one `ReadDict` over a `TensorSource` (shapes, dtypes, a read and a close
function). This module is the only one of `files/` that imports sd-mecha, so following a new
sd-mecha release touches it alone.
"""

from __future__ import annotations

import dataclasses
import pathlib
import threading
from collections.abc import Callable, Iterator, KeysView, Mapping, Sequence
from typing import NoReturn

import sd_mecha.extensions.model_formats as formats
import torch
from sd_mecha.streaming import SafetensorsMapping, StateDictKeyError, TensorMetadata

from . import key_layouts, quantized
from .checkpoint import PICKLE_SUFFIXES, load_pickle


def _nothing() -> None:
    pass


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """A file as sd-mecha's read dict needs it: key -> shape and dtype (in file order), a function
    reading one key's tensor, and one releasing what the reader holds."""

    shapes: Mapping[str, Sequence[int]]
    dtypes: Mapping[str, torch.dtype]
    read: Callable[[str], torch.Tensor]
    close: Callable[[], None] = _nothing


class ReadDict(SafetensorsMapping):
    """sd-mecha's read-dict interface over a `TensorSource`."""

    def __init__(self, source: TensorSource):
        self.source = source

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.source.shapes:
            raise StateDictKeyError(key)
        return self.source.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.shapes)

    def __len__(self) -> int:
        return len(self.source.shapes)

    def __contains__(self, item: object) -> bool:
        return item in self.source.shapes

    def keys(self) -> KeysView[str]:
        return self.source.shapes.keys()

    def metadata(self) -> Iterator[tuple[str, TensorMetadata]]:
        for key, shape in self.source.shapes.items():
            yield key, TensorMetadata(torch.Size(shape), self.source.dtypes[key])

    def values(self) -> Iterator[torch.Tensor]:
        for key in self.source.shapes:
            yield self[key]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.source.shapes:
            yield key, self[key]

    def close(self) -> None:
        self.source.close()


# --------------------------------------------------------------------------------------------
# Sources


def pickle_source(path: pathlib.Path) -> TensorSource:
    """A pickle's tensors (one `load_pickle`); each read is a copy, as sd-mecha may write into it."""
    sd = load_pickle(path)
    return TensorSource(
        shapes={k: t.shape for k, t in sd.items()},
        dtypes={k: t.dtype for k, t in sd.items()},
        read=lambda key: sd[key].clone(),
    )


def dequantized_source(reader: quantized.ScaledFp8File | quantized.GGUFFile) -> TensorSource:
    """A quantized file's tensors, dequantized by its reader."""

    def read(key: str) -> torch.Tensor:
        ((_, tensor),) = reader.read_tensors([key])
        return tensor

    return TensorSource(reader.shapes, reader.dtypes, read)


def canonical_source(inner: SafetensorsMapping, layout: key_layouts.Layout) -> TensorSource:
    """`inner` (a read dict in the file's keys) read in the canonical keys through `layout`."""

    def read_file(keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            yield key, inner[key]

    def read(key: str) -> torch.Tensor:
        ((_, tensor),) = layout.read([key], read_file)
        return tensor

    return TensorSource(layout.shapes, layout.dtypes, read, inner.close)


# --------------------------------------------------------------------------------------------
# Formats


class _ReadOnlyFormat:
    """A format sd-mecha reads and never writes (its outputs are safetensors)."""

    def get_write_dict(
        self, path: pathlib.Path, model_config: object, mecha_recipe: str, buffer_size: int
    ) -> NoReturn:
        raise RuntimeError("sd_mecha_rebasin writes safetensors only")


class PickleFormat(_ReadOnlyFormat):
    """sd-mecha's model format for `.ckpt` / `.pt` / `.pth` files (read only)."""

    def matches(self, path: pathlib.Path) -> bool:
        return path.suffix.lower() in PICKLE_SUFFIXES

    def get_read_dict(self, path: pathlib.Path, buffer_size: int) -> ReadDict:
        return ReadDict(pickle_source(path))


class GGUFFormat(_ReadOnlyFormat):
    """sd-mecha's model format for GGUF UNets, dequantized (read only)."""

    def matches(self, path: pathlib.Path) -> bool:
        return path.suffix.lower() in quantized.GGUF_SUFFIXES

    def get_read_dict(self, path: pathlib.Path, buffer_size: int) -> ReadDict:
        return ReadDict(dequantized_source(quantized.open_gguf(path)))


_lock = threading.Lock()


def register() -> None:
    """Make sd-mecha read pickles, GGUF, fp8 scaled files and other tools' key layouts; idempotent.

    Order matters: the formats are registered, then `single_file` learns to dequantize, then every
    format (ours, the builtins, and any another package registered since the last call) is wrapped
    once to read canonical keys. A pickle or GGUF format already registered by someone else is
    left in charge of its files.
    """
    with _lock:
        _dequantize_single_file()
        _register_once(GGUFFormat, pathlib.Path("probe.gguf"), "sd_mecha_rebasin_gguf")
        _register_once(PickleFormat, pathlib.Path("probe.ckpt"), "sd_mecha_rebasin_torch_pickle")
        _read_key_layouts()


def _register_once(cls: type, probe: pathlib.Path, identifier: str) -> None:
    if not any(fmt.matches(probe) for fmt in formats.get_all()):
        formats.register_model_format(cls, identifier=identifier)


def _dequantize_single_file() -> None:
    """Wrap the builtin `single_file` reader: fp8 scaled files dequantized, refused formats refused,
    every other file read by sd-mecha's own reader, unchanged."""
    single = next((f for f in formats.get_all() if getattr(f, "identifier", None) == "single_file"), None)
    if single is None or getattr(single, "_sd_rebasin_dequantizes", False):
        return
    own = single.get_read_dict

    def get_read_dict(path: pathlib.Path, buffer_size: int) -> SafetensorsMapping:
        reader = quantized.open_quantized(path)
        return own(path, buffer_size) if reader is None else ReadDict(dequantized_source(reader))

    single.get_read_dict = get_read_dict
    single._sd_rebasin_dequantizes = True


def _read_key_layouts() -> None:
    """Wrap every format's reader: a file with canonical keys is read by the format's own reader,
    unchanged; another is read through its `key_layouts.Layout`."""
    for fmt in formats.get_all():
        if getattr(fmt, "_sd_rebasin_canonical", False):
            continue
        own = fmt.get_read_dict

        def get_read_dict(path: pathlib.Path, buffer_size: int, own=own) -> SafetensorsMapping:
            inner = own(path, buffer_size)
            shapes, dtypes = {}, {}
            for key, meta in inner.metadata():
                shapes[key], dtypes[key] = tuple(meta.shape), meta.dtype
            layout = key_layouts.plan(path, shapes, dtypes)
            return inner if layout.identity else ReadDict(canonical_source(inner, layout))

        fmt.get_read_dict = get_read_dict
        fmt._sd_rebasin_canonical = True
