"""The small SD1 layout of `sd-rebasin demo` and of the tests: sd1-ldm's key names, every width
divided by about ten, and the facts (heads, GroupNorm groups) that its shapes do not tell."""

from __future__ import annotations

CONFIG = "sd1-ldm"

DEMO_LAYOUT_KEY = "sd_rebasin_layout"
DEMO_LAYOUT = "demo-small-sd1"
"""Metadata that marks a file of this layout, so that the commands take its shapes and facts."""

SMALL_DIMS = {
    # CLIP ViT-L text encoder: width, MLP, vocabulary
    768: 64,
    3072: 256,
    49408: 1000,
    # UNet: channels, concatenations, GEGLU, time embedding (768 above is also the context width)
    320: 32,
    640: 64,
    960: 96,
    1280: 128,
    1920: 192,
    2560: 256,
    5120: 512,
    10240: 1024,
}
"""Full-size dimension -> small dimension; 1, 3 (kernels), 4 (latent channels) and 77 (tokens) stay."""

KEPT_DIMS = frozenset({1, 3, 4, 77})

SMALL_ARCH = {"unet": {"num_heads": 8, "groupnorm_groups": 8}, "clip_l": {"heads": 4}}
"""Facts of the small model that shapes do not tell: 8 UNet heads as in SD1, 8 GroupNorm groups
(32 would leave 1-channel groups at width 32), 4 text-encoder heads of 16."""


def _shrink(key: str, dim: int) -> int:
    if dim in SMALL_DIMS:
        return SMALL_DIMS[dim]
    if dim in KEPT_DIMS:
        return dim
    raise ValueError(f"no small size for dimension {dim} of {key}")


def small_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the small SD1 model: sd1-ldm's text encoder and UNet keys, shrunk."""
    from .. import model_configs

    components = model_configs.resolve(CONFIG).components()
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ("clip_l", "diffuser"):
        for key, meta in components[name].keys().items():
            if not meta.dtype.is_floating_point:
                continue
            shapes[key] = tuple(_shrink(key, d) for d in meta.shape)
    return shapes
