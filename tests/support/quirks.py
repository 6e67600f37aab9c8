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


# --------------------------------------------------------------------------------------------
# Other tools' key layouts (written from the canonical tensors, independently of the reader)

SDXL_CLIP_G = "conditioner.embedders.1.model."
SD2_CLIP_H = "cond_stage_model.model."


def openclip_to_hf(sd: Mapping[str, torch.Tensor], prefix: str, new_prefix: str) -> dict[str, torch.Tensor]:
    """The OpenCLIP text encoder under `prefix` rewritten in transformers' CLIPTextModel layout under
    `new_prefix` (q/k/v split out of `in_proj`, `text_projection` as a Linear weight: transposed,
    `logit_scale` kept as `<new_prefix>logit_scale`); every other key as it is, order kept."""
    import re

    names = (
        (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
        (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
        (
            r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(\w+)",
            r"text_model.encoder.layers.\1.self_attn.out_proj.\2",
        ),
        (r"transformer\.resblocks\.(\d+)\.ln_1\.(\w+)", r"text_model.encoder.layers.\1.layer_norm1.\2"),
        (r"transformer\.resblocks\.(\d+)\.ln_2\.(\w+)", r"text_model.encoder.layers.\1.layer_norm2.\2"),
        (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(\w+)", r"text_model.encoder.layers.\1.mlp.fc1.\2"),
        (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(\w+)", r"text_model.encoder.layers.\1.mlp.fc2.\2"),
        (r"ln_final\.(\w+)", r"text_model.final_layer_norm.\1"),
        (r"logit_scale", "logit_scale"),
    )
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if not key.startswith(prefix):
            out[key] = t
            continue
        rest = key[len(prefix) :]
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", rest)
        if m:
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[f"{new_prefix}text_model.encoder.layers.{m[1]}.self_attn.{part}_proj.{m[2]}"] = (
                    chunk.clone()
                )
            continue
        if rest == "text_projection":
            out[new_prefix + "text_projection.weight"] = t.t().contiguous()
            continue
        for pattern, target in names:
            if re.fullmatch(pattern, rest):
                out[new_prefix + re.sub(pattern, target, rest)] = t
                break
        else:
            raise AssertionError(f"no transformers name for {key}")
    return out


def to_forge(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A canonical SD1/SD2/SDXL state dict as Forge saved it before 2025 (`save_checkpoint`):
    `text_encoders.clip_l|clip_g|clip_h.` (transformers layout under `transformer.`, `logit_scale`
    beside it) and `vae.`; the UNet as it is."""
    sdxl = any(k.startswith(SDXL_CLIP_G) for k in sd)
    out = dict(sd)
    if sdxl:
        g_logit = out.pop(SDXL_CLIP_G + "logit_scale", None)
        out = openclip_to_hf(out, SDXL_CLIP_G, "text_encoders.clip_g.transformer.")
        if g_logit is not None:
            out["text_encoders.clip_g.logit_scale"] = g_logit
    if any(k.startswith(SD2_CLIP_H) for k in sd):
        h_logit = out.pop(SD2_CLIP_H + "logit_scale", None)
        out = openclip_to_hf(out, SD2_CLIP_H, "text_encoders.clip_h.transformer.")
        if h_logit is not None:
            out["text_encoders.clip_h.logit_scale"] = h_logit
    clip_l = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    renamed: dict[str, torch.Tensor] = {}
    for key, t in out.items():
        if key.startswith(clip_l):
            key = "text_encoders.clip_l.transformer." + key[len(clip_l) :]
        elif key.startswith("first_stage_model."):
            key = "vae." + key[len("first_stage_model.") :]
        renamed[key] = t
    return renamed
