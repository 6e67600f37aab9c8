"""Small UNet-only models for the tests: the demo's small SD1 model, its UNet under a hidden legal
UNet-only permutation (text encoders absent, so cross-attention k/v columns stay), in each key
layout, and written as a ComfyUI-GGUF file."""

from __future__ import annotations

import pathlib

import gguf
import torch

from sd_mecha_rebasin.architectures import permutation_spec
from sd_mecha_rebasin.architectures.small import SMALL_ARCH, small_shapes
from sd_mecha_rebasin.cli.demo import random_weights, scheduler_buffers
from sd_mecha_rebasin.model_configs.unet_only import layout_name
from sd_mecha_rebasin.permutations.spec import Permutations, apply_permutation, random_permutation

UNET = "model.diffusion_model."
CLIP = "cond_stage_model.transformer.text_model."
LAYOUTS = {"prefixed": "sd1-ldm", "bare": "sd1-ldm_unet_only", "diffusers": "sd1-diffusers_unet_only"}
"""How a UNet-only file names its keys -> its sd-mecha config."""


def unet_of(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith(UNET)}


def permuted_unet(full: dict[str, torch.Tensor], seed: int) -> tuple[dict[str, torch.Tensor], Permutations]:
    """`full`'s UNet under a random legal UNet-only permutation (LDM names), and that permutation."""
    unet = unet_of(full)
    spec = permutation_spec("sd1-ldm", arch=SMALL_ARCH, shapes={k: tuple(v.shape) for k, v in unet.items()})
    hidden = random_permutation(spec, seed)
    return apply_permutation(spec, hidden, unet), hidden


def small_models(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Permutations]:
    """A full small SD1 model (with scheduler buffers and position ids), a hidden UNet-only
    permutation of its UNet, and that permutation."""
    full = random_weights(small_shapes(), seed)
    b_unet, hidden = permuted_unet(full, seed + 1)
    full.update(scheduler_buffers())
    full[CLIP + "embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return full, b_unet, hidden


def in_layout(unet: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """A UNet (LDM names with `model.diffusion_model.`) in another layout of `LAYOUTS`."""
    return {layout_name(LAYOUTS[layout], k): v for k, v in unet.items()}


def write_unet_gguf(
    path: pathlib.Path, unet: dict[str, torch.Tensor], arch: str = "sd1"
) -> dict[str, torch.Tensor]:
    """A UNet-only GGUF (bare LDM names) as ComfyUI-GGUF writes it: matrices Q8_0, the rest F32.
    Returns the dequantized values (bare names) that a reader must produce."""
    writer = gguf.GGUFWriter(path=None, arch=arch)
    expected = {}
    q8 = gguf.GGMLQuantizationType.Q8_0
    for key, value in unet.items():
        name = key[len(UNET) :]
        array = value.float().numpy()
        if value.dim() == 2 and value.shape[1] % 32 == 0:
            raw = gguf.quants.quantize(array, q8)
            writer.add_tensor(name, raw, raw_dtype=q8)
            array = gguf.quants.dequantize(raw, q8)
        else:
            writer.add_tensor(name, array)
        expected[name] = torch.from_numpy(array.copy()).reshape(value.shape)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected
