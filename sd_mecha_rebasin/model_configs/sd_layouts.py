"""Key layouts (names and shapes) of full-size SD1, SD2 and SDXL checkpoints, and SD's UNet as a
diffusers config: what a checkpoint of each family holds, in one place for the tests' forward-pass
harness (tests/support/) and the quality benchmark (benchmarks/quality/).

The names are those of the sd-mecha configs ``sd1-ldm`` and ``sdxl-sgm`` (read from sd-mecha
itself) and, for SD2, derived here from ``sd1-ldm`` plus the OpenCLIP ViT-H text tower, not read
from this package's ``sd2-ldm.yaml`` (so that the harness can check that config against an
independent derivation). Only the components that take part in the forward pass are listed: the
text encoder(s) and the UNet (``diffuser``); VAE, EMA and scheduler buffers are left out.
"""

from __future__ import annotations

from functools import cache

from .unet_only import UNET_PREFIX

FAMILIES = ("sd1", "sd2", "sdxl")

#: Key prefix of every component, per family.
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

#: diffusers ``UNet2DConditionModel`` settings shared by the SD1 and SD2 UNets (LDM's
#: ``openaimodel.UNetModel`` as diffusers configures it); widths, groups, heads and the context
#: width are per model.
SD_UNET_COMMON: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
}


def _check(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}, expected one of {FAMILIES}")


def component_of(family: str, key: str) -> str:
    """Component (``clip_l``, ``clip_h``, ``clip_g``, ``unet``) a key belongs to.

    Raises ValueError for an unknown family, KeyError for a key under no component prefix."""
    _check(family)
    for component, prefix in PREFIXES[family].items():
        if key.startswith(prefix):
            return component
    raise KeyError(f"{key!r} belongs to no {family} component")


def _from_sd_mecha(ident: str, components: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Float keys of the given sd-mecha config components (integer buffers and, in the
    diffuser, the non-weight metadata such as SDXL's ``edm_vpred.*`` are left out)."""
    from . import resolve  # the package's gateway to sd-mecha's configs (it does not import this module)

    config_components = resolve(ident).components()
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
            if len(shape) != 4 or shape[2:] != (1, 1):
                raise ValueError(f"sd1-ldm {key} has shape {shape}, expected a 1x1 conv")
            shape = shape[:2]
        elif key.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")):
            if shape[1] != 768:
                raise ValueError(f"sd1-ldm {key} has shape {shape}, expected 768 context columns")
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


def full_key_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """Key name -> shape of a family's text encoder(s) and UNet at full size, in its checkpoint
    layout (``sd1``: sd-mecha's ``sd1-ldm``; ``sdxl``: ``sdxl-sgm``; ``sd2``: `sd2_full_layout`).

    Raises ValueError for an unknown family."""
    _check(family)
    return dict(_full(family))
