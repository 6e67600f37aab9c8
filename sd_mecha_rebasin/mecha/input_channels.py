"""The sd-mecha merge method that fills a plain model's missing input channels from a variant model
(inpainting, instruct-pix2pix), so that a weighted sum keeps the variant's extra channels exactly.
See `files.variants` for the convention."""

# No `from __future__ import annotations`: sd-mecha evaluates the Parameter annotations at runtime.
import torch
from sd_mecha import Parameter, Return, StateDict, merge_method
from torch import Tensor

from ..files.variants import INPUT_CONVS, same_but_input_channels

FILL_IDENTIFIER = "sd_rebasin_fill_input_channels"


@merge_method(identifier=FILL_IDENTIFIER)
def fill_input_channels(
    a: Parameter(StateDict[Tensor]),
    like: Parameter(StateDict[Tensor]),
    **kwargs,
) -> Return(Tensor):
    """`a`, with the input channels that `like` has beyond `a`'s appended from `like` (first UNet
    convolution only; every other key is `a`'s). Merged with `like` by a weighted sum, those
    channels come out exactly as `like` has them.

    :param a: the model that may have fewer input channels (a plain model).
    :param like: the model whose extra input channels are used (an inpainting/instruct-pix2pix model).
    """
    key = kwargs["key"]
    value = a[key]
    if key not in INPUT_CONVS:
        return value
    other = like[key]
    if other.shape[1] <= value.shape[1] or not same_but_input_channels(key, value.shape, other.shape):
        return value
    return torch.cat([value, other[:, value.shape[1] :].to(value)], dim=1)
