"""Reading safetensors files defensively: the header checked completely, then tensors by offset.

Format (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian header length
N, N bytes of UTF-8 JSON (an object: optional `__metadata__` str -> str, then name -> {dtype, shape,
data_offsets}, offsets relative to the end of the header), then the data. The first byte of a valid
file is the low byte of N, so it can be any value (0x80 included): a file's type is never guessed
from its first bytes before this parse has failed (see `pickle_signature`).

`read_header` refuses, as a `UserError` naming the file and the problem, everything the reference
implementation refuses (lengths past the end of the file or over its 100 MB limit, bad JSON,
duplicate names, unknown dtypes, negative or non-integer shapes, offsets that do not match the
shape or overlap another tensor or lie past the end of the file, non-string metadata), and it reads
no more than the header's declared length, after checking that the file holds that many bytes.
Unlike the reference implementation it accepts bytes that belong to no tensor (some downloaders
and savers leave bytes after the last tensor): `Header.extra_bytes` counts them, the caller warns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

MAX_HEADER_BYTES = 100_000_000
"""The reference implementation's limit on the JSON header (safetensors' MAX_HEADER_SIZE)."""

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype name -> torch dtype, for the dtypes this tool reads and writes. sd-mecha 1.1.8
reads all but U8 (see `checkpoint.validate`, which refuses U8 where sd-mecha would read it)."""
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header: dtype, shape and byte range [begin, end) of the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclasses.dataclass(frozen=True)
class Header:
    """A checked safetensors header."""

    tensors: dict[str, TensorEntry]
    """Name -> entry, in the header's order."""
    metadata: dict[str, str]
    data_start: int
    """Byte offset of the data section (8 + N)."""
    size: int
    """File size in bytes."""
    extra_bytes: int
    """Bytes of the data section that belong to no tensor (after the last one, or between two)."""


class HeaderError(ValueError):
    """The file is not a valid safetensors file; `str()` is the problem in words."""


def pickle_signature(head: bytes) -> str | None:
    """ "zip" or "pickle" when `head` (a file's first bytes) starts like a PyTorch checkpoint.

    The full signatures only: the zip local-header magic `PK\\x03\\x04` (torch.save since 1.6), or
    the pickle PROTO opcode 0x80 followed by a protocol number 2 to 5 (legacy torch.save). Only
    meaningful for a file that failed to parse as safetensors: a valid safetensors file can start
    with either byte sequence (its first 8 bytes are the header length).
    """
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"corrupt safetensors header: the name {shown(key)} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise HeaderError(f"corrupt safetensors header: JSON constant {name} is not allowed")


def shown(name: str, limit: int = 80) -> str:
    """A tensor or metadata name as messages show it: quoted, escaped (one line), at most `limit` chars."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_header(raw: bytes, data_start: int, size: int) -> Header:
    """Check the N header bytes `raw` of a file of `size` bytes; HeaderError names the problem."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except HeaderError:
        raise
    except UnicodeDecodeError:
        raise HeaderError("not a safetensors file (the header is not UTF-8 text)") from None
    except (ValueError, RecursionError):
        raise HeaderError("not a safetensors file (the header is not JSON)") from None
    if not isinstance(obj, dict):
        raise HeaderError("not a safetensors file (the header is not a JSON object)")
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict):  # null included: sd-mecha's reader fails on it
        raise HeaderError("corrupt safetensors header: __metadata__ is not a map of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise HeaderError(
                f"corrupt safetensors header: __metadata__ value {shown(key)} is not a string "
                f"({type(value).__name__})"
            )
    data_size = size - data_start
    tensors: dict[str, TensorEntry] = {}
    for key, info in obj.items():
        tensors[key] = _entry(key, info, data_size)
    ranges = sorted((e.begin, e.end, k) for k, e in tensors.items() if e.end > e.begin)
    covered, last_end, previous = 0, 0, None
    for begin, end, key in ranges:
        if begin < last_end:
            raise HeaderError(
                f"corrupt safetensors header: the data of {shown(key)} overlaps the data of {shown(previous)}"
            )
        covered += end - begin
        last_end, previous = end, key
    return Header(tensors, dict(metadata), data_start, size, data_size - covered)


def _entry(key: str, info: Any, data_size: int) -> TensorEntry:
    def bad(problem: str) -> HeaderError:
        return HeaderError(f"corrupt safetensors header: {shown(key)} {problem}")

    if not isinstance(info, dict):
        raise bad(f"is a {type(info).__name__}, not a tensor entry")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str):
        raise bad("has no dtype")
    if dtype_name not in DTYPES:
        raise HeaderError(f"{shown(key)} has dtype {shown(dtype_name, 20)}, which this tool does not read")
    if not isinstance(shape, list) or any(_int(d) is None or d < 0 for d in shape):
        raise bad(f"has shape {json.dumps(shape)[:60]}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or any(_int(x) is None for x in offsets):
        raise bad("has no valid data_offsets (two integers)")
    begin, end = offsets
    dtype = DTYPES[dtype_name]
    numel = 0 if 0 in shape else 1
    for d in shape if numel else ():
        numel *= d
        if numel > data_size:  # larger than the file whatever follows: stop before the number grows
            break
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if not 0 <= begin <= end:
        raise bad(f"has data_offsets [{begin}, {end}] (start after end, or negative)")
    if end - begin != nbytes:
        raise bad(f"has data_offsets [{begin}, {end}] ({end - begin} bytes) for {nbytes} bytes of data")
    if end > data_size:
        raise HeaderError(
            f"truncated safetensors file: {shown(key)} ends at byte {end} of a data section of {data_size} bytes"
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def read_header(path: str | os.PathLike) -> Header:
    """Read and check the header of a safetensors file (reads 8 + N bytes at most).

    Raises HeaderError naming the problem (the caller adds the file name), OSError if unreadable.
    """
    path = pathlib.Path(path)
    size = path.stat().st_size
    if size < 8:
        raise HeaderError(f"not a safetensors file ({size} bytes, too short for a header)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n == 0 or n > size - 8 and n > MAX_HEADER_BYTES:
            raise HeaderError("not a safetensors file (no valid header)")
        if n > size - 8:
            raise HeaderError(
                f"truncated safetensors file: its header needs {8 + n} bytes, the file has {size}"
            )
        if n > MAX_HEADER_BYTES:
            raise HeaderError(
                f"its safetensors header is {n} bytes long, over the format's limit of {MAX_HEADER_BYTES} "
                "(a huge metadata block?)"
            )
        raw = f.read(n)
    if len(raw) != n:
        raise HeaderError("the file changed while being read")
    return parse_header(raw, 8 + n, size)


def read_tensors(
    path: str | os.PathLike, header: Header, keys: Iterable[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for `keys`, each read from its byte range (its own memory, CPU)."""
    with open(path, "rb", buffering=0) as f:
        for key in keys:
            entry = header.tensors[key]
            n = entry.end - entry.begin
            if n == 0:
                yield key, torch.empty(entry.shape, dtype=entry.dtype)
                continue
            buf = bytearray(n)
            f.seek(header.data_start + entry.begin)
            view, got = memoryview(buf), 0
            while got < n:
                step = f.readinto(view[got:])
                if not step:
                    raise OSError(f"unexpected end of file reading {key}")
                got += step
            yield key, torch.frombuffer(buf, dtype=entry.dtype).view(entry.shape)
