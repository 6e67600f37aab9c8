"""Key layouts (names and shapes) of SD1, SD2 and SDXL checkpoints, full-size and tiny.

The full-size layouts are `sd_mecha_rebasin.model_configs.sd_layouts` (sd-mecha's ``sd1-ldm`` and
``sdxl-sgm``, and an SD2 layout derived there without reading this project's ``sd2-ldm.yaml``, so
that the harness does not trust the config it is meant to check).

"tiny" layouts keep every key name of "full" and scale each dimension with a per-component
table, so that a permutation spec written against key names and head/group counts applies to
both, while tiny forward passes take a fraction of a second.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Mapping

import torch

from sd_mecha_rebasin.common.workers import worker_pool
from sd_mecha_rebasin.model_configs.sd_layouts import FAMILIES, component_of, full_key_shapes

SIZES = ("tiny", "full")

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


def arch_overrides(family: str, size: str) -> dict[str, dict[str, int]]:
    """Architecture facts that shapes do not reveal: head counts/widths and GroupNorm groups."""
    _check(family, size)
    return {component: dict(facts) for component, facts in _ARCH[family, size].items()}


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
    full = full_key_shapes(family)
    if size == "full":
        return full
    return {key: _shrink(family, key, shape) for key, shape in full.items()}


def _key_seed(seed: int, key: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(key.encode())) % (2**63)


PARALLEL_ELEMENTS = 1 << 26
"""Above this many elements a state dict is generated on every core: torch's seeded `randn` runs
on one thread, and the full-size SDXL's 3.5 G values took ~15 s each time on one."""


def random_state_dict(
    shapes: Mapping[str, tuple[int, ...]], seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights whose forward passes stay finite and non-trivial at full size.

    Matrices and conv kernels ~ N(0, 1/fan_in) with fan_in = prod(shape[1:]) (``text_projection``,
    used as ``x @ W``, reads shape[0]); 1-d ``weight`` (LayerNorm/GroupNorm scales) ~ 1 + 0.1 N;
    biases and other vectors ~ 0.1 N; scalars (``logit_scale``) = log(1 / 0.07). Each key has its
    own generator seeded from (seed, key), so values do not depend on which other keys exist or on
    how many threads make them; at most one fp32 tensor per thread is alive besides the result.
    """

    def fill(key: str, out: torch.Tensor) -> torch.Tensor:
        shape = out.shape
        if len(shape) == 0:
            return out.fill_(math.log(1 / 0.07))
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
        return out.copy_(t)

    # The results are allocated here, the float32 temporaries in the workers: results made in the
    # workers' heaps, between freed temporaries, left ~8 GB of holes on the full-size SDXL.
    out = {key: torch.empty(shape, dtype=dtype) for key, shape in shapes.items()}
    large = sum(t.numel() for t in out.values()) > PARALLEL_ELEMENTS
    with worker_pool((os.cpu_count() or 1) if large else 1) as pool:  # randn releases the GIL
        list(pool.map(fill, out, out.values()))
    return out
