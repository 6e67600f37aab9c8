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

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import groups
from .spec import Permutations, PermutationSpec

ROWS_PER_CHUNK_ELEMENTS = 1 << 22
"""Elements reduced at a time: features never need a float copy of a whole tensor."""


MAX_POSITIONS = 32
"""Per unit and tensor axis, at most this many positions of the unpermuted axes keep their own
features; beyond that, neighbouring positions are pooled (a token embedding's 49408 rows would
otherwise make 49408 features per unit of the residual stream)."""


def unit_features(spec: PermutationSpec, key: str, value: torch.Tensor, axis: int, seg) -> torch.Tensor:
    """`(units, f)` float32 features of the segment's units that no other permutation changes.

    The mean and the mean square over the other permuted axes, at each position of the unpermuted
    axes (a 1-D tensor: each unit's value and its square), pooled to at most `MAX_POSITIONS`.
    """
    m = len(seg.units)
    slices = value.narrow(axis, seg.start, m).movedim(axis, 0)
    moved = [other + 1 if other < axis else other for other in spec.axes[key] if other != axis]
    per_unit = max(1, slices[:1].numel())
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // per_unit)
    parts = []
    for lo in range(0, m, step):
        chunk = slices[lo : lo + step].to(torch.float32, copy=True)  # squared in place below
        rows = len(chunk)
        if moved:
            mean = chunk.mean(dim=moved).reshape(rows, -1)
            mean_square = chunk.square_().mean(dim=moved).reshape(rows, -1)
        else:  # no other axis is permuted: every entry keeps its place
            mean = chunk.reshape(rows, -1)
            mean_square = mean.square()
        if mean.shape[1] > MAX_POSITIONS:
            pool = torch.nn.functional.adaptive_avg_pool1d
            mean = pool(mean[:, None, :], MAX_POSITIONS)[:, 0]
            mean_square = pool(mean_square[:, None, :], MAX_POSITIONS)[:, 0]
        parts.append(torch.cat([mean, mean_square], dim=1))
    return torch.cat(parts)


def _space_cost(
    spec: PermutationSpec, space: str, ref: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor]
) -> np.ndarray | None:
    """`-distance(ref unit u, model unit v)` over standardised invariant features, or None if none.

    Each feature is scaled by its spread over the units of both models, and each tensor axis
    weighs the same whatever its number of features, so no single key dominates. Units that a
    segment does not cover get zeros for its features.
    """
    n = spec.spaces[space].size
    ref_parts, model_parts = [], []
    for key, axis, seg in spec.segments_of(space):
        if key not in ref or key not in model:
            continue
        x = unit_features(spec, key, ref[key], axis, seg)
        y = unit_features(spec, key, model[key], axis, seg)
        both = torch.cat([x, y])
        mean, scale = both.mean(dim=0), both.std(dim=0).clamp_min(1e-12) * np.sqrt(x.shape[1])
        for part, parts in ((x, ref_parts), (y, model_parts)):
            placed = torch.zeros(n, x.shape[1])
            placed[torch.from_numpy(seg.units)] = (part - mean) / scale
            parts.append(placed)
    if not ref_parts:
        return None
    x, y = torch.cat(ref_parts, dim=1), torch.cat(model_parts, dim=1)
    # -||x_u - y_v||^2, built in place: at 5120 units every n x n temporary is 100 MB.
    score = (x @ y.T).mul_(2).sub_(x.square().sum(1)[:, None]).sub_(y.square().sum(1)[None, :])
    return score.double().numpy()


def invariant_feature_start(
    spec: PermutationSpec,
    ref: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    init: Permutations,
    *,
    threads: int = 1,
    solver: str | None = None,
) -> Permutations:
    """Each permutation matched on its own from invariant features (spaces with none keep `init`)."""

    def solve(space: str) -> np.ndarray:
        cost = _space_cost(spec, space, ref, model)
        if cost is None:
            return init[space]
        return groups.best_element(spec.spaces[space].tree, cost, solver)

    names = sorted(spec.spaces)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return dict(zip(names, pool.map(solve, names)))
