"""UNet-only key layouts: the one table of how a UNet without text encoders names its keys.

ComfyUI keeps UNets apart (`models/diffusion_models/`), GGUF conversions hold only the UNet, and
many fine-tunes and distilled SDXL UNets are published without text encoders. Three ways of naming
the same UNet occur:

- LDM names with `model.diffusion_model.`: the full config itself (sd1-ldm, sd2-ldm, sdxl-sgm),
  with its text-encoder and VAE keys absent. No entry here: `text_encoders_present` says it.
- LDM names without any prefix (`input_blocks.0.0.weight`; GGUF): `<family>_unet_only` configs.
- diffusers names (`down_blocks.0.resnets.0.conv1.weight`): `<family>-diffusers_unet_only`
  configs; sd-mecha ships the SDXL one, this package the SD1 and SD2 ones.

Every UNet-only config is the UNet of a full config, key for key: `ldm_names(config)` maps its key
names to the full config's (`model.diffusion_model.` + LDM name), so the permutation rules, the
shape checks and the conversions are written once, in LDM names.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping

UNET_PREFIX = "model.diffusion_model."


@dataclasses.dataclass(frozen=True)
class UnetOnlyLayout:
    """A UNet-only sd-mecha config: which full config it is the UNet of, and how it names keys."""

    identifier: str
    full: str
    """The full config (sd1-ldm, sd2-ldm, sdxl-sgm) whose UNet this is."""
    names: str
    """"ldm" (LDM names without a prefix) or "diffusers"."""
    ours: bool = True
    """False for sd-mecha's own `sdxl-diffusers_unet_only` (we register no YAML for it)."""


UNET_ONLY_LAYOUTS: dict[str, UnetOnlyLayout] = {
    layout.identifier: layout
    for layout in (
        UnetOnlyLayout("sd1-ldm_unet_only", "sd1-ldm", "ldm"),
        UnetOnlyLayout("sd2-ldm_unet_only", "sd2-ldm", "ldm"),
        UnetOnlyLayout("sdxl-sgm_unet_only", "sdxl-sgm", "ldm"),
        UnetOnlyLayout("sd1-diffusers_unet_only", "sd1-ldm", "diffusers"),
        UnetOnlyLayout("sd2-diffusers_unet_only", "sd2-ldm", "diffusers"),
        UnetOnlyLayout("sdxl-diffusers_unet_only", "sdxl-sgm", "diffusers", ours=False),
    )
}
"""sd-mecha config identifier -> its UNet-only layout."""

CONTEXT_WIDTH_FAMILY = {768: "sd1-ldm", 1024: "sd2-ldm", 2048: "sdxl-sgm"}
"""Cross-attention key width (`attn2.to_k.weight` shape[1]) -> full config; 1280 is the SDXL refiner."""

MARKER_KEY = {"ldm": "input_blocks.0.0.weight", "diffusers": "conv_in.weight"}
"""A key every UNet of that naming has (the stem convolution)."""

_RESNET = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}
_TOP = {
    "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.",
    "label_emb.0.0.": "add_embedding.linear_1.",
    "label_emb.0.2.": "add_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.",
    "out.0.": "conv_norm_out.",
    "out.2.": "conv_out.",
}
_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?(\d+)\.(.*)$")


def _resnet(rest: str) -> str:
    for ldm, diffusers in _RESNET.items():
        if rest.startswith(ldm):
            return diffusers + rest[len(ldm) :]
    raise ValueError(rest)


def ldm_to_diffusers(name: str) -> str | None:
    """The diffusers UNet2DConditionModel name of an LDM UNet key (without `model.diffusion_model.`).

    The rule of SD1, SD2 and SDXL (two ResBlocks per level, then a down- or upsampler); None for a
    name outside it. Transformer internals (`proj_in`, `transformer_blocks.N.attn1.to_q`, ...) keep
    their names.
    """
    for ldm, diffusers in _TOP.items():
        if name.startswith(ldm):
            return diffusers + name[len(ldm) :]
    m = _BLOCK.match(name)
    if m is None:
        return None
    where, block, sub, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    try:
        if where == "middle_block" and block is None:
            if sub == 1:
                return "mid_block.attentions.0." + rest
            return f"mid_block.resnets.{sub // 2}." + _resnet(rest)
        if block is None:
            return None
        i = int(block)
        if where == "input_blocks":
            level, j = divmod(i - 1, 3)
            if j == 2:
                return f"down_blocks.{level}.downsamplers.0.conv." + rest.removeprefix("op.")
            if sub == 0:
                return f"down_blocks.{level}.resnets.{j}." + _resnet(rest)
            return f"down_blocks.{level}.attentions.{j}." + rest
        level, j = divmod(i, 3)
        if sub == 0:
            return f"up_blocks.{level}.resnets.{j}." + _resnet(rest)
        if rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0." + rest
        return f"up_blocks.{level}.attentions.{j}." + rest
    except ValueError:
        return None


def layout_name(identifier: str, ldm_key: str) -> str | None:
    """The name a full-config UNet key (`model.diffusion_model.` + LDM name) has in a UNet-only
    config; the key itself for a full config; None where the UNet-only layout has no such key."""
    layout = UNET_ONLY_LAYOUTS.get(identifier)
    if layout is None:
        return ldm_key
    if not ldm_key.startswith(UNET_PREFIX):
        return None
    name = ldm_key[len(UNET_PREFIX) :]
    return name if layout.names == "ldm" else ldm_to_diffusers(name)


@functools.cache
def ldm_names(identifier: str) -> dict[str, str]:
    """Key of a UNet-only config -> the full config's key (empty for a full config)."""
    layout = UNET_ONLY_LAYOUTS.get(identifier)
    if layout is None:
        return {}
    from . import resolve

    out = {}
    for key in resolve(layout.full).keys():
        name = layout_name(identifier, key)
        if name is not None:
            out[name] = key
    return out


def full_config(identifier: str) -> str:
    """The full config a config's UNet belongs to (itself for a full config)."""
    layout = UNET_ONLY_LAYOUTS.get(identifier)
    return identifier if layout is None else layout.full


def unet_only_config(shapes: Mapping[str, tuple[int, ...]], hint: str | None = None) -> str | None:
    """The UNet-only config of a file without `model.diffusion_model.` keys, from its key names and
    cross-attention width; None when it is no UNet-only file. `hint` (a full config: a GGUF's
    `general.architecture`, the demo's small-model mark) decides where the width is no real one.
    Raises ValueError for a width no supported family has (the SDXL refiner's 1280, say)."""
    for names, marker in MARKER_KEY.items():
        if marker not in shapes:
            continue
        width = next(
            (
                int(shape[1])
                for key, shape in shapes.items()
                if key.endswith(".attn2.to_k.weight") and len(shape) == 2
            ),
            None,
        )
        if width is None:
            raise ValueError("a UNet-only file without cross-attention keys (attn2.to_k)")
        full = CONTEXT_WIDTH_FAMILY.get(width) or (hint if width != 1280 else None)
        if full is None:
            what = "an SDXL refiner UNet" if width == 1280 else f"cross-attention {width} wide"
            raise ValueError(f"a UNet-only file of {what}; only SD1, SD2 and SDXL base UNets are supported")
        for layout in UNET_ONLY_LAYOUTS.values():
            if layout.full == full and layout.names == names:
                return layout.identifier
    return None
