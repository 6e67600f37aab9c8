"""Key layouts (names and shapes) of SD1, SD2 and SDXL checkpoints, full-size and tiny.

The names are those of the sd-mecha configs ``sd1-ldm`` and ``sdxl-sgm`` (read from sd-mecha
itself) and of this project's ``sd2-ldm`` (derived here from ``sd1-ldm`` plus the OpenCLIP ViT-H
text tower, so that the harness does not trust the config it is meant to check). Only the
components that take part in the forward pass are listed: the text encoder(s) and the UNet
(``diffuser``); VAE, EMA and scheduler buffers are left out.

"tiny" layouts keep every key name of "full" and scale each dimension with a per-component
table, so that a permutation spec written against key names and head/group counts applies to
both, while tiny forward passes take a fraction of a second.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from functools import cache

import torch

FAMILIES = ("sd1", "sd2", "sdxl")
SIZES = ("tiny", "full")

UNET_PREFIX = "model.diffusion_model."

#: Key prefix of every component, per family; forward.py strips these to reach module names.
PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {
        "clip_l": "cond_stage_model.transformer.text_model.",
        "unet": UNET_PREFIX,
    },
    "sd2": {
        "clip_h": "cond_stage_model.model.",
        "unet": UNET_PREFIX,
    },
    "sdxl": {
        "clip_l": "conditioner.embedders.0.transformer.text_model.",
        "clip_g": "conditioner.embedders.1.model.",
        "unet": UNET_PREFIX,
    },
}

# Dimensions that are not widths: conv kernels (1, 3), latent channels (4), token positions (77).
_KEPT_DIMS = frozenset({1, 3, 4, 77})

_VOCAB = {49408: 1000}
_CLIP_L_TINY = {768: 64, 3072: 256, **_VOCAB}
# UNet widths scale by 1/10 (320 -> 32, ..., 10240 -> 1024: channels, concatenations, GEGLU,
# time embedding 1280 -> 128); only the context width depends on the text encoder(s).
_UNET_TINY = {320: 32, 640: 64, 960: 96, 1280: 128, 1920: 192, 2560: 256, 5120: 512, 10240: 1024}

#: original dimension -> tiny dimension, per family and component.
TINY_DIMS: dict[str, dict[str, dict[int, int]]] = {
    "sd1": {
        "clip_l": _CLIP_L_TINY,
        "unet": {**_UNET_TINY, 768: 64},
    },
    "sd2": {
        "clip_h": {1024: 64, 3072: 192, 4096: 256, **_VOCAB},
        "unet": {**_UNET_TINY, 1024: 64},
    },
    "sdxl": {
        "clip_l": _CLIP_L_TINY,
        "clip_g": {1280: 96, 3840: 288, 5120: 384, **_VOCAB},
        # context 768 + 1280 -> 64 + 96; label_emb input 1280 + 6 * 256 -> 96 + 6 * 16.
        "unet": {**_UNET_TINY, 2048: 160, 2816: 192},
    },
}

_ARCH: dict[tuple[str, str], dict[str, dict[str, int]]] = {
    ("sd1", "full"): {"unet": {"num_heads": 8, "groupnorm_groups": 32}, "clip_l": {"heads": 12}},
    ("sd1", "tiny"): {"unet": {"num_heads": 8, "groupnorm_groups": 8}, "clip_l": {"heads": 4}},
    ("sd2", "full"): {"unet": {"head_dim": 64, "groupnorm_groups": 32}, "clip_h": {"heads": 16}},
    ("sd2", "tiny"): {"unet": {"head_dim": 8, "groupnorm_groups": 8}, "clip_h": {"heads": 4}},
    ("sdxl", "full"): {
        "unet": {"head_dim": 64, "groupnorm_groups": 32},
        "clip_l": {"heads": 12},
        "clip_g": {"heads": 20},
    },
    ("sdxl", "tiny"): {
        "unet": {"head_dim": 8, "groupnorm_groups": 8},
        "clip_l": {"heads": 4},
        "clip_g": {"heads": 6},
    },
}


def _check(family: str, size: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}, expected one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}, expected one of {SIZES}")


def component_of(family: str, key: str) -> str:
    """Component (``clip_l``, ``clip_h``, ``clip_g``, ``unet``) a key belongs to."""
    for component, prefix in PREFIXES[family].items():
        if key.startswith(prefix):
            return component
    raise KeyError(f"{key!r} belongs to no {family} component")


def arch_overrides(family: str, size: str) -> dict[str, dict[str, int]]:
    """Architecture facts that shapes do not reveal: head counts/widths and GroupNorm groups."""
    _check(family, size)
    return {component: dict(facts) for component, facts in _ARCH[family, size].items()}


def _from_sd_mecha(ident: str, components: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Float keys of the given sd-mecha config components (integer buffers and, in the
    diffuser, the non-weight metadata such as SDXL's ``edm_vpred.*`` are left out)."""
    from sd_mecha.extensions import model_configs

    config_components = model_configs.resolve(ident).components()
    shapes: dict[str, tuple[int, ...]] = {}
    for name in components:
        for key, meta in config_components[name].keys().items():
            if not meta.dtype.is_floating_point:
                continue  # position_ids, SDXL v_pred / ztsnr flags
            if name == "diffuser" and not key.startswith(UNET_PREFIX):
                continue  # SDXL edm_vpred.sigma_min / sigma_max: not UNet weights
            shapes[key] = tuple(meta.shape)
    return shapes


def _open_clip_text_layout(
    prefix: str, width: int, layers: int, vocab: int = 49408
) -> dict[str, tuple[int, ...]]:
    """An OpenCLIP text tower's state dict (as kept in LDM/SGM checkpoints)."""
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}token_embedding.weight": (vocab, width),
        f"{prefix}positional_embedding": (77, width),
    }
    for i in range(layers):
        block = f"{prefix}transformer.resblocks.{i}."
        shapes.update(
            {
                f"{block}ln_1.weight": (width,),
                f"{block}ln_1.bias": (width,),
                f"{block}attn.in_proj_weight": (3 * width, width),
                f"{block}attn.in_proj_bias": (3 * width,),
                f"{block}attn.out_proj.weight": (width, width),
                f"{block}attn.out_proj.bias": (width,),
                f"{block}ln_2.weight": (width,),
                f"{block}ln_2.bias": (width,),
                f"{block}mlp.c_fc.weight": (4 * width, width),
                f"{block}mlp.c_fc.bias": (4 * width,),
                f"{block}mlp.c_proj.weight": (width, 4 * width),
                f"{block}mlp.c_proj.bias": (width,),
            }
        )
    shapes.update(
        {
            f"{prefix}ln_final.weight": (width,),
            f"{prefix}ln_final.bias": (width,),
            f"{prefix}text_projection": (width, width),
            f"{prefix}logit_scale": (),
        }
    )
    return shapes


def sd2_full_layout() -> dict[str, tuple[int, ...]]:
    """SD2 (LDM layout) = OpenCLIP ViT-H/14 text tower under ``cond_stage_model.model.`` plus
    the sd1-ldm UNet with linear proj_in/proj_out and 1024-wide cross-attention context."""
    shapes = _open_clip_text_layout(PREFIXES["sd2"]["clip_h"], width=1024, layers=24)
    for key, shape in _from_sd_mecha("sd1-ldm", ("diffuser",)).items():
        if key.endswith((".proj_in.weight", ".proj_out.weight")):
            assert len(shape) == 4 and shape[2:] == (1, 1), (key, shape)
            shape = shape[:2]
        elif key.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")):
            assert shape[1] == 768, (key, shape)
            shape = (shape[0], 1024)
        shapes[key] = shape
    return shapes


@cache
def _full(family: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    if family == "sd1":
        shapes = _from_sd_mecha("sd1-ldm", ("clip_l", "diffuser"))
    elif family == "sdxl":
        shapes = _from_sd_mecha("sdxl-sgm", ("clip_l", "clip_g", "diffuser"))
    else:
        shapes = sd2_full_layout()
    for key in shapes:
        component_of(family, key)  # every key must sit under a known prefix
    return tuple(shapes.items())


def _shrink(family: str, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    table = TINY_DIMS[family][component_of(family, key)]
    tiny = []
    for dim in shape:
        if dim in table:
            tiny.append(table[dim])
        elif dim in _KEPT_DIMS:
            tiny.append(dim)
        else:
            raise ValueError(f"no tiny size for dimension {dim} of {key} {shape}")
    return tuple(tiny)


def key_shapes(family: str, size: str) -> dict[str, tuple[int, ...]]:
    """Key name -> shape of the text encoder(s) and UNet of a family, in its checkpoint layout."""
    _check(family, size)
    full = dict(_full(family))
    if size == "full":
        return full
    return {key: _shrink(family, key, shape) for key, shape in full.items()}


def _key_seed(seed: int, key: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(key.encode())) % (2**63)


def random_state_dict(
    shapes: Mapping[str, tuple[int, ...]], seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights whose forward passes stay finite and non-trivial at full size.

    Matrices and conv kernels ~ N(0, 1/fan_in) with fan_in = prod(shape[1:]) (``text_projection``,
    used as ``x @ W``, reads shape[0]); 1-d ``weight`` (LayerNorm/GroupNorm scales) ~ 1 + 0.1 N;
    biases and other vectors ~ 0.1 N; scalars (``logit_scale``) = log(1 / 0.07). Each key has its
    own generator seeded from (seed, key), so values do not depend on which other keys exist, and
    at most one fp32 tensor is alive besides the result.
    """
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if len(shape) == 0:
            out[key] = torch.tensor(math.log(1 / 0.07), dtype=dtype)
            continue
        gen = torch.Generator().manual_seed(_key_seed(seed, key))
        t = torch.randn(shape, generator=gen, dtype=torch.float32)
        if key.endswith("text_projection"):
            t *= shape[0] ** -0.5
        elif len(shape) >= 2:
            t *= math.prod(shape[1:]) ** -0.5
        elif key.endswith("weight"):
            t.mul_(0.1).add_(1.0)
        else:
            t *= 0.1
        out[key] = t.to(dtype)
        del t
    return out
