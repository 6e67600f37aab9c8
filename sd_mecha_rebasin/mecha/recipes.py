"""The sd-mecha recipes the command line builds and runs, so that `cli/` never calls sd-mecha itself
and following a new sd-mecha release touches this layer only.

`rebasin` options (`iters`, `seed`, `threads`, `device`, `precision`, and MergeMany's own) are
passed through as keyword arguments of the merge methods (`merge_method`, `merge_method_many`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sd_mecha
import torch

from ..files.checkpoint import Checkpoint
from ..files.variants import input_channels
from .input_channels import fill_input_channels
from .merge_method import rebasin
from .merge_method_many import rebasin_many


def model_node(ckpt: Checkpoint, config: str) -> sd_mecha.RecipeNode:
    """`sd_mecha.model` of a checkpoint in `config`'s key names (converted from a UNet-only layout
    through `mecha.unet_only`'s conversions where its own config differs)."""
    node = sd_mecha.model(str(ckpt.path.resolve()), ckpt.config)
    return node if ckpt.config == config else sd_mecha.convert(node, config)


def pair_recipe(
    mode: str,
    a: Checkpoint,
    b: Checkpoint,
    config: str,
    alpha: Any,
    options: Mapping[str, Any],
) -> sd_mecha.RecipeNode:
    """The recipe of a pair job in `config`'s keys: `mode` "align" is `git_rebasin(B, A)`, "merge"
    the weighted sum of A and it, "average" the weighted sum of A and B. `alpha` is a number or a
    per-key recipe node (`blocks.Alpha.node`). When A has more input channels than B (an
    inpainting A), B's are filled from A's, so that A's extra channels come out as A has them."""
    model_a = model_node(a, config)
    model_b = model_node(b, config)
    if mode == "align":
        return rebasin(model_b, model_a, **options)
    other = model_b if mode == "average" else rebasin(model_b, model_a, **options)
    if (input_channels(a.canonical_shapes()) or 0) > (input_channels(b.canonical_shapes()) or 0):
        other = fill_input_channels(other, model_a)
    return sd_mecha.weighted_sum(model_a, other, alpha=alpha)


def merge_into(
    recipe: sd_mecha.RecipeNode,
    output: dict[str, Any],
    dtype: torch.dtype,
    threads: int | None,
    tqdm: Callable[..., Any],
) -> None:
    """Run `recipe` on the CPU into `output` (a dict; sd-mecha adds `__metadata__` with the recipe).

    Keys the config lacks are not checked (the key policy keeps them, `jobs.assemble`), and inputs
    are not screened for NaN/Inf here (the job scanned them before)."""
    sd_mecha.merge(
        recipe,
        output=output,
        output_dtype=dtype,
        merge_device="cpu",
        threads=threads,
        tqdm=tqdm,
        check_extra_keys=False,
        omit_non_finite_inputs=False,
    )


def many_recipe(ckpts: Sequence[Checkpoint], **options: Any) -> sd_mecha.RecipeNode:
    """`git_rebasin_many` over the checkpoints, each in its own config."""
    nodes = [sd_mecha.model(str(c.path.resolve()), c.config) for c in ckpts]
    return rebasin_many(*nodes, **options)


def serialize(node: sd_mecha.RecipeNode) -> str:
    """A recipe's text as sd-mecha writes it, not finalized (so no model file is opened for it)."""
    return sd_mecha.serialize(node, finalize=False)
