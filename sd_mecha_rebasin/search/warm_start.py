"""A cheap starting point for weight matching, from features that no other permutation changes.

Weight matching re-solves a permutation whenever a neighbour changed, so from the identity it
needs several full sweeps before the permutations settle (4 for a fine-tuned and permuted SD1
pair), and every sweep costs a full set of matrix products. But some statistics of a unit do not
depend on any other permutation: the slice of a tensor at one unit only has its entries
reordered when the other axes are permuted, so its sum and its sum of squares over those axes
are invariant (unpermuted axes, such as a kernel's positions, are kept apart). Matching the units
of each space by the distance between such features is one pass over the weights and one small
assignment per space; the sweeps that follow start near the answer and mostly confirm it.

It is only a starting point: `weight_matching` keeps it only if it beats the identity on the real
objective, and the sweeps that follow are exact, so it changes where the search starts, never what
counts as a legal or a locally best permutation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ..common.memory import return_freed_memory, scratch
from ..common.workers import worker_pool
from ..permutations import groups
from ..permutations.spec import Permutations, PermutationSpec

ROWS_PER_CHUNK_ELEMENTS = 1 << 20
"""Elements reduced at a time (4 MiB in float32): features never need a float copy of a whole
tensor. Smaller than the products' slices: on two threads, 16 MiB chunks ran slower here (SD1
features 2.05 s vs 1.35 s) and left 1.3 GB of freed chunks in the threads' heaps (1M: 0.9 GB)."""


MAX_POSITIONS = 32
"""Per unit and tensor axis, at most this many positions of the unpermuted axes keep their own
features; beyond that, neighbouring positions are pooled (a token embedding's 49408 rows would
otherwise make 49408 features per unit of the residual stream)."""


def _pooled(mean: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
    """`(units, f)` features from `(units, positions)` means: positions pooled to `MAX_POSITIONS`."""
    if mean.shape[1] > MAX_POSITIONS:
        pool = torch.nn.functional.adaptive_avg_pool1d
        mean = pool(mean[:, None, :], MAX_POSITIONS)[:, 0]
        mean_square = pool(mean_square[:, None, :], MAX_POSITIONS)[:, 0]
    return torch.cat([mean, mean_square], dim=1)


def key_features(spec: PermutationSpec, key: str, value: torch.Tensor) -> dict[int, torch.Tensor]:
    """`(axis length, f)` float32 features along each permuted axis of `key`, none changed by another
    permutation: the mean and the mean square over the other permuted axes, at each position of
    the unpermuted axes (a unit with no other permuted axis: its values and their squares), pooled
    to at most `MAX_POSITIONS` positions.

    One pass over the tensor serves every axis: rows of the first permuted axis are read a chunk at
    a time, that axis's features come from each chunk, and the other axes' sums accumulate over the
    chunks.
    """
    if value.dim() == 0:
        value = value[None]
    first, *others = sorted(spec.axes[key])
    view = value.movedim(first, 0)  # the other permuted axes come after `first`: their numbers stay
    axes = [0, *others]
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // max(1, view[:1].numel()))
    row_parts = []
    sums: dict[int, list[torch.Tensor]] = {}
    for lo in range(0, view.shape[0], step):
        chunk = view[lo : lo + step].to(torch.float32, copy=True)  # squared in place: one buffer
        rows = len(chunk)
        stats = []  # (per-row means, per-axis sums) of the values, then of their squares
        for squared in (False, True):
            if squared:
                chunk.square_()
            # No other axis permuted: every entry keeps its place (cloned: squared in place next).
            row_mean = chunk.mean(dim=others) if others else chunk.clone()
            stats.append(
                (
                    row_mean.reshape(rows, -1),
                    [chunk.sum(dim=[a for a in axes if a != axis]) for axis in others],
                )
            )
        (mean, value_sums), (mean_square, square_sums) = stats
        row_parts.append(_pooled(mean, mean_square))
        for axis, value_sum, square_sum in zip(others, value_sums, square_sums):
            if axis in sums:
                sums[axis][0] += value_sum
                sums[axis][1] += square_sum
            else:
                sums[axis] = [value_sum, square_sum]
    out = {first: torch.cat(row_parts)}
    for axis, (total, total_square) in sums.items():
        count = math.prod(view.shape[a] for a in axes if a != axis)
        moved = axis - sum(1 for a in axes if a < axis)  # its index once the reduced axes are gone
        total, total_square = (
            t.movedim(moved, 0).reshape(view.shape[axis], -1) / count for t in (total, total_square)
        )
        out[axis] = _pooled(total, total_square)
    return out


KeyFeatures = dict[int, torch.Tensor]


def _space_cost(
    spec: PermutationSpec, space: str, features: Mapping[str, tuple[KeyFeatures, KeyFeatures]]
) -> np.ndarray | None:
    """`-distance(ref unit u, model unit v)` over standardised invariant features, or None if none.

    Each feature is scaled by its spread over the units of both models, and each tensor axis
    weighs the same whatever its number of features, so no single key dominates. Units that a
    segment does not cover get zeros for its features.
    """
    n = spec.spaces[space].size
    ref_parts, model_parts = [], []
    for key, axis, seg in spec.segments_of(space):
        if key not in features:
            continue
        units = slice(seg.start, seg.start + len(seg.units))
        x, y = (of_model[axis][units] for of_model in features[key])
        both = torch.cat([x, y])
        mean, scale = both.mean(dim=0), both.std(dim=0).clamp_min(1e-12) * np.sqrt(x.shape[1])
        for part, parts in ((x, ref_parts), (y, model_parts)):
            placed = torch.zeros(n, x.shape[1])
            placed[torch.from_numpy(seg.units)] = (part - mean) / scale
            parts.append(placed)
    if not ref_parts:
        return None
    x, y = (torch.cat(parts, dim=1).double() for parts in (ref_parts, model_parts))
    # -||x_u - y_v||^2, built in place in this thread's buffer (at 5120 units, 200 MB), in float64
    # as the solver takes it: the product is small (a few features per unit, or few units).
    score = torch.matmul(x, y.T, out=scratch("features", (n, n), torch.float64))
    score.mul_(2).sub_(x.square().sum(1)[:, None]).sub_(y.square().sum(1)[None, :])
    return score.numpy()  # valid until this thread's next call


DIAGONAL_MARGIN = 1e-9
"""Relative margin by which each diagonal entry must beat the rest of its row in
`diagonal_certain`, far above the float64 rounding of an assignment solver's dual updates."""


def diagonal_certain(score: np.ndarray) -> bool:
    """Whether every row of the square `score` has its maximum on the diagonal, by a margin: the
    identity is then the unique maximum-sum assignment (the sum of the row maxima bounds every
    assignment and only the identity reaches it), over any subgroup that contains it too.
    `score` is changed during the call and restored (no copy of a matrix of up to 200 MB)."""
    n = len(score)
    if n < 2:
        return True
    diagonal = np.diagonal(score).copy()
    np.fill_diagonal(score, -np.inf)
    try:
        best = score.max(axis=1)
    finally:
        np.fill_diagonal(score, diagonal)
    margin = DIAGONAL_MARGIN * (np.abs(diagonal) + np.abs(best) + 1e-300)
    return bool((diagonal > best + margin).all())


def invariant_feature_start(
    spec: PermutationSpec,
    ref: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    init: Permutations,
    *,
    threads: int = 1,
    solver: str | None = None,
    on_step: Callable[[], None] | None = None,
) -> Permutations:
    """Each permutation matched on its own from invariant features (spaces with none keep `init`).

    `on_step()` is called in the calling thread after each key's features and each space's
    assignment (progress: keys held by both models, then every space)."""
    step = on_step or (lambda: None)

    def both(key: str) -> tuple[KeyFeatures, KeyFeatures]:
        return key_features(spec, key, ref[key]), key_features(spec, key, model[key])

    def solve(space: str) -> np.ndarray:
        cost = _space_cost(spec, space, features)
        if cost is None:
            return init[space]
        return groups.best_element(spec.spaces[space].tree, cost, solver)

    def counted(results: Iterator[Any]) -> Iterator[Any]:
        for result in results:
            step()
            yield result

    keys = [key for key in spec.axes if key in ref and key in model]
    names = sorted(spec.spaces)
    with worker_pool(threads) as pool:
        features = dict(zip(keys, counted(pool.map(both, keys))))  # one pass over each tensor, all axes
        return_freed_memory()  # the chunks of that pass, freed into the worker threads' heaps
        return dict(zip(names, counted(pool.map(solve, names))))
