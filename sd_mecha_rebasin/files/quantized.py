"""Quantized downloads: fp8 "scaled" safetensors and GGUF files read as dequantized tensors; the rest refused.

Quantized files store codes plus scales; merging codes is meaningless (two fp8 files with different
scales averaged code by code give a model that renders white, with no error). Every quantized
weight is therefore dequantized exactly, in float32, when it is read, and the scale tensors are
hidden: the rest of the package (validation, matching, sd-mecha's streaming, the output) sees an
ordinary checkpoint whose quantized weights are float32 and whose scale keys do not exist.

fp8 scaled safetensors, as ComfyUI loads them (`comfy/utils.py` `convert_old_quants`,
`comfy/ops.py` `mixed_precision_ops`, `comfy/quant_ops.py` `TensorCoreFP8Layout.dequantize`):

- legacy: `<module>.weight` fp8 with `<module>.scale_weight` (float32, one value per layer),
  optional `<module>.scale_input` (an activation scale), and a `scaled_fp8` marker tensor (under
  the model's prefix; its dtype names the fp8 format). ComfyUI renames them to the newer names.
- newer: `<module>.weight` fp8 with `<module>.weight_scale`, optional `<module>.input_scale`, and
  the layer's format either in `<module>.comfy_quant` (the UTF-8 JSON `{"format": "float8_e4m3fn",
  ...}` as a uint8 tensor) or in the safetensors metadata `_quantization_metadata` (JSON
  `{"layers": {"<module>": {"format": ...}}}`).
- the weight is `weight.to(float32) * scale`; the scale is one value (shape [] or [1]), or one
  per output row (shape [out, 1, ...], which broadcasts over the row). Layers without a scale
  (norms, biases, embeddings, fp8 weights without one) are read as they are stored (scale 1, as
  ComfyUI's old scaled-fp8 ops assumed). Other comfy_quant formats (nvfp4, mxfp8, int8 variants)
  and scales of any other shape (per block, per column) are refused: `UNSUPPORTED_FORMATS`.

GGUF (city96's ComfyUI-GGUF `tools/convert.py` and `loader.py`): UNet-only files whose
`general.architecture` is `sd1` or `sdxl` (`GGUF_ARCHITECTURES`), tensors named as in the source
checkpoint with `model.diffusion_model.` stripped (bare LDM names; kept as they are here), F32 /
F16 / BF16 / Q8_0 / Q4_K / ... blocks, and tensors flattened to rows of 256 whose original shape
is the INT32 array `comfy.gguf.orig_shape.<name>`; otherwise the shape is the reverse of GGML's.
Read with the `gguf` package (`GGUFReader`, memory-mapped) and dequantized with
`gguf.quants.dequantize` (the package's reference implementation, float32); F16 tensors stay float16
(exact). A type `gguf` cannot dequantize is refused naming it.

Formats that cannot be dequantized exactly (bitsandbytes NF4 / FP4 / LLM.int8, NVFP4, GPTQ/AWQ) are
refused from their key names alone, in one line naming the file and the format, before anything
is read: `UNSUPPORTED_FORMATS`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ..common.errors import UserError
from . import safetensors_file
from .safetensors_file import Header, HeaderError

# --------------------------------------------------------------------------------------------
# The formats, as data

SCALE_SUFFIXES: dict[str, str] = {".scale_weight": "legacy scaled fp8", ".weight_scale": "comfy_quant fp8"}
"""Key suffix of a per-layer weight scale -> the convention's name; it scales `<module>.weight`."""

HIDDEN_SUFFIXES: tuple[str, ...] = (".scale_input", ".input_scale", ".comfy_quant")
"""Keys that describe how ComfyUI runs a layer (activation scales, the layer's format): no weights,
never merged and never written."""

SCALED_FP8_MARKER = "scaled_fp8"
"""The legacy marker tensor (`<prefix>scaled_fp8`, e.g. `model.diffusion_model.scaled_fp8`)."""

FP8_FORMATS: dict[str, str] = {"float8_e4m3fn": "fp8 e4m3fn", "float8_e5m2": "fp8 e5m2"}
"""comfy_quant / _quantization_metadata formats that are fp8 codes times one scale (dequantized)."""

QUANTIZATION_METADATA = "_quantization_metadata"

UNSUPPORTED_FORMATS: tuple[tuple[str, str], ...] = (
    (r"\.quant_state\.bitsandbytes__nf4$", "bitsandbytes NF4 (4-bit)"),
    (r"\.quant_state\.bitsandbytes__fp4$", "bitsandbytes FP4 (4-bit)"),
    (r"\.(absmax|quant_map|nested_absmax|nested_quant_map)$", "bitsandbytes 4-bit (NF4/FP4)"),
    (r"\.SCB$", "bitsandbytes LLM.int8"),
    (r"\.weight_scale_2$", "NVFP4"),
    (r"\.(qweight|qzeros|g_idx)$", "GPTQ/AWQ int4"),
)
"""Key pattern -> quantization format that this tool cannot dequantize exactly (refused; first match)."""

ADVICE = "merge the fp16/bf16 release of this model instead (or convert this file to fp16 first)"

GGUF_SUFFIXES = (".gguf",)
GGUF_MAGIC = b"GGUF"
GGUF_ARCHITECTURES: dict[str, str] = {"sd1": "SD1", "sdxl": "SDXL"}
"""GGUF `general.architecture` values read (ComfyUI-GGUF's names) -> family."""
GGUF_ORIG_SHAPE = "comfy.gguf.orig_shape."


def refuse_unsupported(path: str | os.PathLike, keys: Iterable[str]) -> None:
    """UserError naming the file and the format when a key shows a format `UNSUPPORTED_FORMATS` lists."""
    keys = list(keys)
    for pattern, name in UNSUPPORTED_FORMATS:
        rx = re.compile(pattern)
        hit = next((k for k in keys if rx.search(k)), None)
        if hit is not None:
            raise UserError(
                f"is quantized with {name} (e.g. {safetensors_file.shown(hit)}), which cannot be "
                f"dequantized exactly; {ADVICE}",
                path,
            )


def refuse_in_pickle(path: str | os.PathLike, keys: Iterable[str]) -> None:
    """Refuse a .ckpt/.pt whose keys show a quantized format (read only from .safetensors / .gguf)."""
    keys = list(keys)
    refuse_unsupported(path, keys)
    scale = next((k for k in keys if k.endswith(tuple(SCALE_SUFFIXES))), None)
    if scale is not None:
        raise UserError(
            f"holds fp8 scales ({safetensors_file.shown(scale)}) in a PyTorch pickle; fp8 scaled files "
            "are read from .safetensors only (save it as .safetensors)",
            path,
        )


def _refuse(path: pathlib.Path, what: str) -> UserError:
    return UserError(f"{what}, which cannot be dequantized exactly; {ADVICE}", path)


# --------------------------------------------------------------------------------------------
# fp8 scaled safetensors


class ScaledFp8File:
    """A safetensors file with fp8 scaled weights, read as float32 weights (`weight * scale`).

    `shapes` and `dtypes` describe what `read_tensors` yields: every key but the scale, activation
    scale, comfy_quant and marker keys; scaled weights as float32.
    """

    def __init__(
        self, path: pathlib.Path, header: Header, scales: dict[str, torch.Tensor], hidden: set[str], fmt: str
    ):
        self.path = path
        self.header = header
        self.scales = scales
        """Weight key -> its float32 scale, shaped to broadcast over the weight ([] or [out, 1, ...])."""
        self.format = fmt
        """What `inspect` shows, e.g. "fp8 scaled (legacy scaled fp8), 123 layers"."""
        self.shapes = {k: e.shape for k, e in header.tensors.items() if k not in hidden}
        self.dtypes = {
            k: torch.float32 if k in scales else e.dtype for k, e in header.tensors.items() if k not in hidden
        }

    def read_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for `keys` (names of `shapes`); scaled weights dequantized in float32."""
        for key, tensor in safetensors_file.read_tensors(self.path, self.header, keys):
            scale = self.scales.get(key)
            yield key, tensor if scale is None else tensor.to(torch.float32) * scale


def open_scaled_fp8(path: str | os.PathLike, header: Header) -> ScaledFp8File | None:
    """The fp8 scaled reading of a checked safetensors header, or None for a file without scales.

    Raises UserError (naming the file and the format) for formats in `UNSUPPORTED_FORMATS`, for
    comfy_quant formats other than fp8, for a scale without its weight and for scales of a shape
    that is neither one value nor one per output row. Reads only the small scale and comfy_quant
    tensors.
    """
    path = pathlib.Path(path)
    keys = header.tensors
    refuse_unsupported(path, keys)
    formats = _layer_formats(path, header)
    scale_of = {}
    conventions = set()
    for key in keys:
        for suffix, convention in SCALE_SUFFIXES.items():
            if key.endswith(suffix):
                weight = key[: -len(suffix)] + ".weight"
                if weight in scale_of:
                    raise UserError(f"has two scales for {weight}: {scale_of[weight]} and {key}", path)
                scale_of[weight] = key
                conventions.add(convention)
    marker = [k for k in keys if k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER)]
    if not scale_of and not formats and not marker:
        return None
    for layer, fmt in formats.items():
        if fmt not in FP8_FORMATS:
            raise _refuse(
                path, f"holds {fmt!r} layers (comfy_quant format of {safetensors_file.shown(layer)})"
            )
        weight = _weight_key(layer, keys)
        if weight is None:
            raise UserError(
                f"its quantization metadata names the layer {safetensors_file.shown(layer)}, which has no weight",
                path,
            )
        if weight not in scale_of:
            raise UserError(f"{weight} is {fmt} without a weight_scale: its values are unknown", path)
    scales: dict[str, torch.Tensor] = {}
    for (weight, scale_key), (_, scale) in zip(
        scale_of.items(), safetensors_file.read_tensors(path, header, list(scale_of.values()))
    ):
        if weight not in keys:
            raise UserError(f"has the scale {scale_key} but no {weight}", path)
        scales[weight] = _broadcast_scale(path, scale_key, scale, keys[weight].shape)
    hidden = set(scale_of.values()) | set(marker) | {k for k in keys if k.endswith(HIDDEN_SUFFIXES)}
    names = ", ".join(sorted(conventions)) or "marker only"
    return ScaledFp8File(path, header, scales, hidden, f"fp8 scaled ({names}), {len(scales)} scaled layers")


def _broadcast_scale(
    path: pathlib.Path, key: str, scale: torch.Tensor, weight_shape: tuple[int, ...]
) -> torch.Tensor:
    if not scale.is_floating_point():
        raise UserError(f"{key} has dtype {str(scale.dtype).removeprefix('torch.')}, not a float scale", path)
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        return scale.reshape(())
    per_row = len(scale.shape) == len(weight_shape) and scale.shape[0] == weight_shape[0]
    if per_row and all(d == 1 for d in scale.shape[1:]):
        return scale
    shape = "[" + ", ".join(str(d) for d in scale.shape) + "]"
    wshape = "[" + ", ".join(str(d) for d in weight_shape) + "]"
    raise _refuse(
        path, f"{key} has shape {shape} for a weight of shape {wshape} (block-wise or per-column fp8 scales)"
    )


def _layer_formats(path: pathlib.Path, header: Header) -> dict[str, str]:
    """Layer name -> comfy_quant format, from `_quantization_metadata` and `<layer>.comfy_quant` tensors."""
    formats: dict[str, str] = {}
    raw = header.metadata.get(QUANTIZATION_METADATA)
    if raw is not None:
        try:
            layers = json.loads(raw).get("layers", {})
            for layer, conf in layers.items():
                formats[layer] = conf if isinstance(conf, str) else conf.get("format")
        except (ValueError, AttributeError):
            raise UserError(
                f"its {QUANTIZATION_METADATA} metadata is not the JSON ComfyUI writes", path
            ) from None
    conf_keys = [k for k in header.tensors if k.endswith(".comfy_quant")]
    for key, tensor in safetensors_file.read_tensors(path, header, conf_keys):
        try:
            conf = json.loads(tensor.to(torch.uint8).numpy().tobytes())
            formats.setdefault(key[: -len(".comfy_quant")], conf.get("format"))
        except (ValueError, AttributeError):
            raise UserError(f"{key} is not the JSON ComfyUI writes", path) from None
    return {layer: str(fmt) for layer, fmt in formats.items()}


def _weight_key(layer: str, keys: Mapping[str, Any]) -> str | None:
    """`<layer>.weight`, or the one key ending in `.<layer>.weight` (metadata that omits a prefix)."""
    if layer + ".weight" in keys:
        return layer + ".weight"
    found = [k for k in keys if k.endswith("." + layer + ".weight")]
    return found[0] if len(found) == 1 else None


# --------------------------------------------------------------------------------------------
# GGUF


class GGUFFile:
    """A GGUF UNet read through `gguf.GGUFReader` (memory-mapped); tensors dequantized on read."""

    def __init__(self, path: pathlib.Path, reader: Any, architecture: str):
        self.path = path
        self.architecture = architecture
        self._tensors = {t.name: t for t in reader.tensors}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        types: dict[str, int] = {}
        for name, t in self._tensors.items():
            shape = _gguf_shape(path, reader, t)
            self.shapes[name] = shape
            self.dtypes[name] = _GGUF_STORED.get(t.tensor_type.name, torch.float32)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        self.format = f"GGUF {architecture} ({', '.join(f'{n} {c}' for n, c in sorted(types.items()))})"

    def read_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for `keys`: dequantized (float32; F16 as float16, BF16 as bfloat16), in the
        original shape, in memory of its own."""
        import gguf

        for key in keys:
            t = self._tensors[key]
            qtype = t.tensor_type
            if qtype == gguf.GGMLQuantizationType.F16:
                values = torch.from_numpy(np.array(t.data, dtype=np.float16, copy=True))
            else:
                try:
                    data = gguf.quants.dequantize(t.data, qtype)
                    if np.shares_memory(data, t.data):  # F32 is a view of the read-only mapping
                        data = data.copy()
                except (NotImplementedError, ValueError) as e:
                    raise UserError(
                        f"GGUF tensor {key} has type {qtype.name}, which gguf cannot dequantize ({e})",
                        self.path,
                    ) from None
                values = torch.from_numpy(data)
                if qtype == gguf.GGMLQuantizationType.BF16:
                    values = values.to(torch.bfloat16)  # exact: bf16 widened to float32 and back
            yield key, values.reshape(self.shapes[key])


_GGUF_STORED = {"F16": torch.float16, "BF16": torch.bfloat16}
"""GGML types read in their own dtype; every other type dequantizes to float32."""


def _gguf_shape(path: pathlib.Path, reader: Any, t: Any) -> tuple[int, ...]:
    field = reader.get_field(GGUF_ORIG_SHAPE + t.name)
    if field is not None:
        try:
            shape = tuple(int(d) for d in field.contents())
        except (TypeError, ValueError):
            raise UserError(
                f"GGUF metadata {GGUF_ORIG_SHAPE}{t.name} is not a list of integers", path
            ) from None
    else:
        shape = tuple(int(d) for d in reversed(t.shape))
    n = 1
    for d in shape:
        n *= d
    if n != int(t.n_elements) or any(d < 0 for d in shape):
        raise UserError(f"GGUF tensor {t.name} has {int(t.n_elements)} values but shape {list(shape)}", path)
    return shape


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF UNet (`general.architecture` sd1 / sdxl); UserError naming GGUF for anything else.

    Reads the header and metadata only (the tensors are memory-mapped); every tensor type is checked
    to be one that `gguf.quants.dequantize` implements, on its first row.
    """
    import gguf

    path = pathlib.Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises many types for bad files
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"not a readable GGUF file ({reason})", path) from None
    field = reader.get_field("general.architecture")
    arch = str(field.contents()) if field is not None else None
    if arch not in GGUF_ARCHITECTURES:
        what = f"architecture {arch!r}" if arch else "no general.architecture (a stable-diffusion.cpp file?)"
        known = " or ".join(GGUF_ARCHITECTURES)
        raise UserError(f"is a GGUF file with {what}; only {known} GGUF UNets (ComfyUI-GGUF) are read", path)
    refuse_unsupported(path, (t.name for t in reader.tensors))
    checked: set[str] = set()
    for t in reader.tensors:
        name = t.tensor_type.name
        if name in checked or name in ("F16", "F32"):
            continue
        try:
            gguf.quants.dequantize(t.data[:1], t.tensor_type)
        except NotImplementedError:
            raise UserError(
                f"GGUF tensor {t.name} has type {name}, which the gguf package cannot dequantize", path
            ) from None
        checked.add(name)
    return GGUFFile(path, reader, arch)


def is_gguf(head: bytes) -> bool:
    """Whether a file's first bytes are GGUF's magic."""
    return head.startswith(GGUF_MAGIC)


# --------------------------------------------------------------------------------------------
# Either format, by file (what `sd_mecha_formats` reads through)


def open_quantized(path: str | os.PathLike) -> ScaledFp8File | GGUFFile | None:
    """The dequantizing reader of a GGUF or fp8 scaled safetensors file, None for other files
    (and for safetensors files whose header does not parse: sd-mecha's reader reports those)."""
    path = pathlib.Path(path)
    if path.suffix.lower() in GGUF_SUFFIXES:
        return open_gguf(path)
    try:
        header = safetensors_file.read_header(path)
    except (HeaderError, OSError):
        return None
    return open_scaled_fp8(path, header)
