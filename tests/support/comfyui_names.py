"""Checkpoint-layout state dicts in ComfyUI's in-memory names, written from ComfyUI's own loaders
(`comfy/supported_models.py` `process_clip_state_dict`, `comfy/utils.py` `transformers_convert`)
without importing ComfyUI: an independent check of the package's `key_layouts.MEMORY_RULES`.

What ComfyUI's loaded objects hold: the UNet under `diffusion_model.` (`BaseModel.state_dict`);
CLIP-L as `clip_l.transformer.text_model.*` with no `position_ids` buffer, plus a
`transformer.text_projection.weight` and a `logit_scale` that no SD1/SDXL checkpoint has; SD2's
OpenCLIP-H as `clip_h.transformer.*` and SDXL's OpenCLIP-G as `clip_g.transformer.*` in
transformers' layout (q/k/v split from `in_proj`, `text_projection` transposed into a Linear's
weight), `logit_scale` beside `transformer.`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

UNET = ("model.diffusion_model.", "diffusion_model.")

_OPENCLIP_RENAMES = (
    (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
    (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    (r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1"),
    (r"transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)", r"text_model.encoder.layers.\1.layer_norm1.\2"),
    (r"transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)", r"text_model.encoder.layers.\1.layer_norm2.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"text_model.encoder.layers.\1.mlp.fc1.\2"),
    (
        r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)",
        r"text_model.encoder.layers.\1.mlp.fc2.\2",
    ),
    (
        r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)",
        r"text_model.encoder.layers.\1.self_attn.out_proj.\2",
    ),
)
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")

CLIP_PREFIXES = {
    "sd1": (("cond_stage_model.transformer.text_model.", "clip_l.transformer.text_model."),),
    "sd2": (("cond_stage_model.model.", "clip_h."),),
    "sdxl": (
        ("conditioner.embedders.0.transformer.text_model.", "clip_l.transformer.text_model."),
        ("conditioner.embedders.1.model.", "clip_g."),
    ),
}


def _openclip(rest: str, tensor: torch.Tensor, to: str) -> dict[str, torch.Tensor]:
    """One OpenCLIP key (after its prefix) in ComfyUI's transformers names under `to`."""
    if rest == "text_projection":
        return {to + "transformer.text_projection.weight": tensor.transpose(0, 1).contiguous()}
    if rest == "logit_scale":
        return {to + "logit_scale": tensor}
    m = _IN_PROJ.fullmatch(rest)
    if m:
        d = tensor.shape[0] // 3
        return {
            f"{to}transformer.text_model.encoder.layers.{m[1]}.self_attn.{p}_proj.{m[2]}": tensor[
                d * i : d * (i + 1)
            ]
            for i, p in enumerate("qkv")
        }
    for pattern, target in _OPENCLIP_RENAMES:
        if re.fullmatch(pattern, rest):
            return {to + "transformer." + re.sub(pattern, target, rest): tensor}
    raise KeyError(rest)


def to_comfyui(
    family: str, state_dict: Mapping[str, torch.Tensor], clip: bool = True
) -> dict[str, torch.Tensor]:
    """ComfyUI's in-memory names for a canonical SD state dict (UNet and, with `clip`, text encoders;
    the VAE and buffers left out), with the CLIP-L keys ComfyUI adds (zeros / its logit scale)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith(UNET[0]):
            out[UNET[1] + key[len(UNET[0]) :]] = tensor
            continue
        if not clip:
            continue
        for src, dst in CLIP_PREFIXES[family]:
            if not key.startswith(src):
                continue
            rest = key[len(src) :]
            if dst.startswith("clip_l."):
                if rest != "embeddings.position_ids":  # ComfyUI's CLIP has no such buffer
                    out[dst + rest] = tensor
            else:
                out.update(_openclip(rest, tensor, dst))
            break
    if clip and any(k.startswith("clip_l.") for k in out):
        width = out["clip_l.transformer.text_model.final_layer_norm.weight"].shape[0]
        out["clip_l.transformer.text_projection.weight"] = torch.eye(width)
        out["clip_l.logit_scale"] = torch.tensor(4.6055)
    return out
