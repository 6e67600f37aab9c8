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


SD_MECHA_BUFFER_BYTES = 1 << 28
"""sd-mecha's default `total_buffer_size`: the read windows of all open safetensors files together."""


def read_buffer_bytes(input_bytes: int) -> int:
    """The `total_buffer_size` for inputs of `input_bytes` in all: sd-mecha's default, or the inputs'
    own size when they are smaller (at least 64 KiB).

    sd-mecha's safetensors reader allocates a window of its full share per file and, at each read
    outside it, copies the whole window and refills it; for small inputs (the demo's, a test's) a
    256 MiB window made that copy most of a merge's reading. Real checkpoints are larger than the
    default, so their merges keep it. What is read is the same either way."""
    return max(1 << 16, min(SD_MECHA_BUFFER_BYTES, input_bytes))


def merge_into(
    recipe: sd_mecha.RecipeNode,
    output: dict[str, Any],
    dtype: torch.dtype,
    threads: int | None,
    tqdm: Callable[..., Any],
    input_bytes: int,
) -> None:
    """Run `recipe` on the CPU into `output` (a dict; sd-mecha adds `__metadata__` with the recipe).

    Keys the config lacks are not checked (the key policy keeps them, `jobs.assemble`), and inputs
    are not screened for NaN/Inf here (the job scanned them before). `input_bytes`, the inputs'
    size on disk, sizes sd-mecha's read windows (`read_buffer_bytes`)."""
    sd_mecha.merge(
        recipe,
        output=output,
        output_dtype=dtype,
        merge_device="cpu",
        threads=threads,
        tqdm=tqdm,
        check_extra_keys=False,
        omit_non_finite_inputs=False,
        total_buffer_size=read_buffer_bytes(input_bytes),
    )


def many_recipe(ckpts: Sequence[Checkpoint], **options: Any) -> sd_mecha.RecipeNode:
    """`git_rebasin_many` over the checkpoints, each in its own config."""
    nodes = [sd_mecha.model(str(c.path.resolve()), c.config) for c in ckpts]
    return rebasin_many(*nodes, **options)


def serialize(node: sd_mecha.RecipeNode) -> str:
    """A recipe's text as sd-mecha writes it, not finalized (so no model file is opened for it)."""
    return sd_mecha.serialize(node, finalize=False)
