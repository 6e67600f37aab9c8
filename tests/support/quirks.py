"""Builders of quirky checkpoint files, as users have them (tests/test_quirks.py, test_fuzz_headers.py).

Tiny models keep every key name of the real layouts (the demo's small SD1 model; tests/support/
layouts.py for SD2 and SDXL), so family detection and the permutation rules see a real checkpoint;
files of the demo layout carry its metadata marker, which makes the CLI check them against the
small shapes instead of the family config's.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Mapping

import torch

from sd_mecha_rebasin.architectures.small import DEMO_LAYOUT, DEMO_LAYOUT_KEY

UNET = "model.diffusion_model."
INPUT_CONV = UNET + "input_blocks.0.0.weight"
SD1_CLIP = "cond_stage_model.transformer.text_model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer.text_model."
DEMO_META = {DEMO_LAYOUT_KEY: DEMO_LAYOUT}

_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


@functools.cache
def _small_pair(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from sd_mecha_rebasin.cli.demo import make_models

    a, b, _, _ = make_models(seed=seed)
    return a, b


def small_pair(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The demo's small SD1 models A and B (B: a permuted, fine-tuned A), fp32, with position_ids
    and scheduler buffers; fresh dicts each call (the tensors are shared: do not change them in place)."""
    a, b = _small_pair(seed)
    return dict(a), dict(b)


def header_json(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    """The compact safetensors JSON header of `tensors`, data laid out in their order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    return json.dumps(header, separators=(",", ":")).encode()


def length_with_residue(minimum: int, residue: int) -> int:
    """The smallest header length >= `minimum` whose low byte is `residue`."""
    return minimum + (residue - minimum) % 256


def save(
    path: pathlib.Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = DEMO_META,
    header_length: int | None = None,
    trailing: bytes = b"",
    raw_header: bytes | None = None,
) -> pathlib.Path:
    """Write a safetensors file by hand: the header padded with spaces to `header_length` bytes
    (any value >= the JSON's length, unlike writers that pad to 8), then the data, then `trailing`.
    `raw_header` replaces the JSON (fuzzing)."""
    raw = header_json(tensors, metadata) if raw_header is None else raw_header
    if header_length is not None:
        assert header_length >= len(raw), (header_length, len(raw))
        raw += b" " * (header_length - len(raw))
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        f.write(trailing)
    return path


def fragment(seed: int = 0) -> dict[str, torch.Tensor]:
    """A few tensors of the small SD1 layout: enough to be opened, detected and read (not merged)."""
    a, _ = small_pair(seed)
    keys = [
        INPUT_CONV,
        UNET + "input_blocks.0.0.bias",
        UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        SD1_CLIP + "final_layer_norm.weight",
        SD1_CLIP + "embeddings.position_ids",
    ]
    return {k: a[k] for k in keys}


def with_input_channels(
    sd: Mapping[str, torch.Tensor], channels: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """An inpainting (9) or instruct-pix2pix (8) variant: the first UNet conv takes `channels`
    inputs; channels 0:4 keep the given weights, the extra ones are new random weights."""
    out = dict(sd)
    conv = sd[INPUT_CONV]
    gen = torch.Generator().manual_seed(1000 + seed)
    extra = torch.randn((conv.shape[0], channels - conv.shape[1], *conv.shape[2:]), generator=gen)
    out[INPUT_CONV] = torch.cat([conv, (extra * conv.float().std()).to(conv.dtype)], dim=1)
    return out


def cast_unet(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The UNet's floating-point weights cast to `dtype` (e.g. fp8), the rest as it is."""
    return {k: v.to(dtype) if k.startswith(UNET) and v.is_floating_point() else v for k, v in sd.items()}


def save_ckpt(path: pathlib.Path, sd: Mapping[str, torch.Tensor], wrapping: str) -> pathlib.Path:
    """A `.ckpt` as training scripts save them: `wrapping` is one of "plain", "state_dict",
    "state_dict.state_dict", "model", "module", "module_prefix" (every key under `module.`),
    "state_dict.module_prefix"."""
    sd = dict(sd)
    if wrapping.endswith("module_prefix"):
        sd = {f"module.{k}": v for k, v in sd.items()}
        wrapping = wrapping.removesuffix("module_prefix").rstrip(".") or "plain"
    obj: object = sd
    if wrapping != "plain":
        for name in reversed(wrapping.split(".")):
            obj = {name: obj, "epoch": 3}
    torch.save(obj, path)
    return path
