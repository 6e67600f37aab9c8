"""UNet input-channel variants: inpainting (9 input channels) and instruct-pix2pix (8).

The first UNet convolution `model.diffusion_model.input_blocks.0.0.weight` reads the 4 latent
channels, plus a mask and a masked-image latent (inpainting: [C, 9, 3, 3]) or an image latent
(instruct-pix2pix: [C, 8, 3, 3]). Its input-channel axis is never permuted (DESIGN.md section 2:
the latent channels are model inputs), so two models of the same variant merge like any pair.

Mixed pairs follow the common convention for merging with a plain model: the variant model is A;
channels 0:4 are merged and its extra channels are kept from A. `fill_input_channels(b, like=a)`
is the sd-mecha merge method that makes this a plain weighted sum: it appends A's extra channels to
B's convolution, so `weighted_sum(a, fill_input_channels(b, a))` gives lerp(A, B, alpha) on channels
0:4 and lerp(x, x, alpha) = x, A's values exactly, on the others. A plain A with a variant B is
refused (put the variant model first); so are two different variants (their extra channels mean
different things). An alignment outputs B's own layout, so any pair aligns: weight matching then
compares the 4 latent channels only (see `match_input_conv`).
"""

import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..model_configs.unet_only import UNET_ONLY_LAYOUTS, layout_name

INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"
INPUT_CONVS = frozenset({INPUT_CONV, *(layout_name(c, INPUT_CONV) for c in UNET_ONLY_LAYOUTS)})
"""The first convolution's name in every key layout (full, bare LDM names, diffusers names)."""
LATENT_CHANNELS = 4
VARIANTS = {4: "standard", 8: "instruct-pix2pix", 9: "inpainting"}
"""Input channels of the first UNet convolution -> the variant's name."""


def variant_shape_ok(key: str, shape: Sequence[int], expected: Sequence[int]) -> bool:
    """Whether `shape` is `expected` with the input channels of a known variant (for `validate`)."""
    return (
        key in INPUT_CONVS
        and len(shape) == len(expected) == 4
        and shape[1] in VARIANTS
        and expected[1] == LATENT_CHANNELS
        and (shape[0], *shape[2:]) == (expected[0], *expected[2:])
    )


def input_channels(shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Input channels of the first UNet convolution (None when the file lacks it)."""
    shape = next((shapes[k] for k in INPUT_CONVS if k in shapes), None)
    return int(shape[1]) if shape is not None and len(shape) == 4 else None


def variant_of(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """ "standard", "inpainting", "instruct-pix2pix" (None: no first convolution, or unknown)."""
    channels = input_channels(shapes)
    return None if channels is None else VARIANTS.get(channels)


def same_but_input_channels(key: str, a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether two shapes of `key` differ only in the first convolution's input channels (both >= 4)."""
    return (
        key in INPUT_CONVS
        and len(a) == len(b) == 4
        and min(a[1], b[1]) >= LATENT_CHANNELS
        and (a[0], *a[2:]) == (b[0], *b[2:])
    )


def check_variant_pair(
    a_name: str,
    a_shapes: Mapping[str, Sequence[int]],
    b_path: str | os.PathLike,
    b_shapes: Mapping[str, Sequence[int]],
    mode: str,
) -> None:
    """Refuse a merge of a plain A with a variant B, or of two different variants.

    `a_shapes` / `b_shapes`: key -> shape (config key names). `mode` "merge" or "average" checks;
    "align" accepts every pair (the output keeps B's own layout). Raises UserError naming B's file.
    """
    from ..common.errors import UserError

    ca, cb = input_channels(a_shapes), input_channels(b_shapes)
    if ca is None or cb is None or ca == cb or mode == "align":
        return
    name_a, name_b = VARIANTS.get(ca, f"{ca}-channel"), VARIANTS.get(cb, f"{cb}-channel")
    if ca == LATENT_CHANNELS:
        raise UserError(
            f"is an {name_b} model ({cb} input channels) and {a_name} is not: put the {name_b} model "
            "first (as A); its extra input channels are then kept and channels 0:4 merged",
            b_path,
        )
    if cb != LATENT_CHANNELS:
        raise UserError(
            f"is an {name_b} model ({cb} input channels) but {a_name} is an {name_a} model ({ca}): "
            "their extra input channels mean different things and cannot be merged",
            b_path,
        )


def match_input_conv(key: str, a: Tensor, ref: Tensor) -> Tensor:
    """`ref`'s value made comparable with `a`'s for weight matching when only the input channels
    differ: its latent channels 0:4, zero-padded to `a`'s channel count (so the matching objective
    sums over the 4 latent channels only). Other keys and equal shapes: `ref` unchanged."""
    if a.shape == ref.shape or not same_but_input_channels(key, tuple(a.shape), tuple(ref.shape)):
        return ref
    out = torch.zeros(a.shape, dtype=ref.dtype, device=ref.device)
    out[:, :LATENT_CHANNELS] = ref[:, :LATENT_CHANNELS]
    return out
