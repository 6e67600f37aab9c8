"""Weight matching (Git Re-Basin, Algorithm 1): coordinate descent over the spec's permutations.

For one permutation p (all others fixed) the objective `L = sum_k <A_k, pi(B_k)>` is linear in p:
`L = <P, C_p> + const`, with `C_p` summed over every tensor axis p permutes. The best legal p is an
exact (nested) assignment on `C_p`. Sweeps visit the permutations in a seeded random order; a
permutation is re-solved only when a neighbour (a space sharing a tensor with it) changed since its
last solve, since otherwise its cost matrix, and so its optimum, is the same. Permutations that
share no tensor are independent: a run of them is solved at once in a thread pool, which gives the
same result as solving them one after another, so the result does not depend on the thread count.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import groups
from .spec import Permutations, PermutationSpec, identity_permutation, permute_tensor

IMPROVEMENT_TOLERANCE = 1e-12
"""A new permutation is kept only if it raises its term of the objective by more than this
(relative to the term's magnitude); otherwise the old one stays, so ties never cause cycling."""


@dataclasses.dataclass(frozen=True)
class SweepStats:
    sweep: int
    objective: float
    """`sum_k <ref_k, pi(model_k)>` over the spec's keys after this sweep (float64)."""
    changed: int
    """Permutations that changed in this sweep."""
    solved: int
    """Permutations whose cost matrix was rebuilt and re-solved in this sweep."""
    rel_distance: float
    """`||ref - pi(model)|| / ||ref - model||` over the spec's keys."""
    seconds: float


@dataclasses.dataclass
class MatchResult:
    perms: Permutations
    history: list[SweepStats]
    """Sweep 0 is the starting point; objectives after it are tracked from the solved gains."""
    converged: bool
    objective: float
    """The final objective, recomputed from the tensors."""
    rel_distance: float
    """The final `||ref - pi(model)|| / ||ref - model||`, recomputed from the tensors."""

    @property
    def final(self) -> SweepStats:
        return self.history[-1]


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def _cost_matrix(
    spec: PermutationSpec,
    space: str,
    ref: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    perms: Permutations,
    device: torch.device,
    own_keys_only: bool = False,
) -> np.ndarray:
    """`C[u, v] = sum over axes of <ref slice at unit u, pi_-p(model) slice at unit v>` (float64).

    Products run in float32 on `device`, one tensor at a time, whatever the stored dtype.
    `own_keys_only` keeps the tensors that no other space permutes (biases, norms): cheap, and
    independent of every other permutation.
    """
    n = spec.spaces[space].size
    cost = torch.zeros(n, n, dtype=torch.float64)
    others = {name: p for name, p in perms.items() if name != space}
    for key in spec.keys_of(space):
        if key not in ref or key not in model:
            continue
        if own_keys_only and spec.spaces_of(key) != [space]:
            continue
        a_full = ref[key]
        b_full = permute_tensor(spec, key, model[key], others)
        for axis, segments in spec.axes[key].items():
            for seg in segments:
                if seg.space != space:
                    continue
                m = len(seg.units)
                a = a_full.narrow(axis, seg.start, m).movedim(axis, 0).reshape(m, -1)
                b = b_full.narrow(axis, seg.start, m).movedim(axis, 0).reshape(m, -1)
                a = a.to(device=device, dtype=torch.float32)
                b = b.to(device=device, dtype=torch.float32)
                product = (a @ b.T).to("cpu", torch.float64)
                units = torch.from_numpy(seg.units)
                if np.array_equal(seg.units, np.arange(seg.units[0], seg.units[0] + m)):
                    lo = int(seg.units[0])
                    cost[lo : lo + m, lo : lo + m] += product
                else:
                    cost.index_put_((units[:, None], units[None, :]), product, accumulate=True)
    return cost.numpy()


def _solve(
    spec: PermutationSpec,
    space: str,
    ref: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    perms: Permutations,
    device: torch.device,
    solver: str | None,
) -> tuple[np.ndarray, bool]:
    """Best legal permutation of `space` with the others fixed, and its gain in the objective."""
    cost = _cost_matrix(spec, space, ref, model, perms, device)
    old = perms[space]
    new = groups.best_element(spec.spaces[space].tree, cost, solver)
    rows = np.arange(len(old))
    old_value, new_value = math.fsum(cost[rows, old]), math.fsum(cost[rows, new])
    if new_value > old_value + IMPROVEMENT_TOLERANCE * max(1.0, abs(old_value)):
        return new, new_value - old_value
    return old, 0.0


def _accurate_sum(x: torch.Tensor, row: int = 4096) -> float:
    """Sum in float32 over short rows, then in float64 across rows: fast and accurate to ~1e-7."""
    x = x.reshape(-1)
    head = x.numel() - x.numel() % row
    total = x[:head].view(-1, row).sum(dim=1).double().sum() if head else torch.zeros((), dtype=torch.float64)
    return float(total + x[head:].double().sum())


def objective_and_distance(
    spec: PermutationSpec,
    ref: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    perms: Permutations,
) -> tuple[float, float]:
    """`(sum_k <ref_k, pi(model_k)>, sum_k ||ref_k - pi(model_k)||^2)` over the spec's keys.

    One tensor at a time in float32 (products of fp16 values are exact in float32).
    """
    dot = sq = 0.0
    for key in spec.axes:
        if key in ref and key in model:
            a = ref[key].float()
            b = permute_tensor(spec, key, model[key], perms).float()
            dot += _accurate_sum(a * b)
            sq += _accurate_sum((a - b).square_())
    return dot, sq


def _warm_start(spec, ref, model, perms, device, solver) -> Permutations:
    """Each permutation solved from its own tensors alone (biases, norms, GEGLU/MLP biases).

    For fine-tunes of one base these already pin most permutations, so the sweeps that follow
    mostly confirm instead of search; spaces with no tensor of their own keep their permutation.
    """
    out = dict(perms)
    for name, space in spec.spaces.items():
        if any(spec.spaces_of(k) == [name] for k in spec.keys_of(name)):
            cost = _cost_matrix(spec, name, ref, model, perms, device, own_keys_only=True)
            out[name] = groups.best_element(space.tree, cost, solver)
    return out


def _batches(order: list[str], spec: PermutationSpec) -> list[list[str]]:
    """Split the visiting order into runs of permutations that pairwise share no tensor."""
    out: list[list[str]] = []
    current: list[str] = []
    blocked: set[str] = set()
    for name in order:
        if name in blocked:
            out.append(current)
            current, blocked = [], set()
        current.append(name)
        blocked |= spec.neighbours(name) | {name}
    if current:
        out.append(current)
    return out


def weight_matching(
    spec: PermutationSpec,
    ref: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    *,
    max_iter: int = 100,
    seed: int = 0,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    solver: str | None = None,
    init: Permutations | None = None,
    warm_start: bool = False,
    on_sweep: Callable[[SweepStats], None] | None = None,
) -> MatchResult:
    """Find the permutations of `model` that bring it closest to `ref` (legal ones only).

    `apply_permutation(spec, result.perms, model)` is `model` aligned to `ref`. Tensors may be
    fp16/bf16/fp32; products accumulate in float32 and cost matrices in float64. `threads=None`
    uses every CPU; the result is bit-identical for any thread count with the same seed.
    `warm_start` first solves each permutation from its own biases and norms (kept only if that
    raises the objective): fewer sweeps, but those low-rank cost matrices make exact assignments
    slow at full size (about 40 s for one 5120-wide GEGLU), so it is off by default. `init`
    starts from given permutations instead of the identity.
    """
    device = torch.device(device)
    threads = threads or default_threads()
    perms = {name: p.copy() for name, p in (init or identity_permutation(spec)).items()}
    for name in spec.spaces:
        perms.setdefault(name, groups.identity(spec.spaces[name].tree))
    rng = np.random.default_rng(seed)
    names = sorted(spec.spaces)
    neighbours = {name: spec.neighbours(name) for name in names}
    dot, sq = objective_and_distance(spec, ref, model, perms)
    base = math.sqrt(sq) if sq > 0 else 1.0
    if warm_start:
        warm = _warm_start(spec, ref, model, perms, device, solver)
        warm_dot, warm_sq = objective_and_distance(spec, ref, model, warm)
        if warm_dot > dot:  # keep it only if it is a better starting point
            perms, dot, sq = warm, warm_dot, warm_sq
    history = [SweepStats(0, dot, 0, 0, math.sqrt(sq) / base, 0.0)]
    dirty = set(names)
    converged = False
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for sweep in range(1, max_iter + 1):
            t0 = time.perf_counter()
            order = [names[i] for i in rng.permutation(len(names))]
            changed = solved = 0
            for batch in _batches(order, spec):
                todo = [name for name in batch if name in dirty]
                snapshot = dict(perms)
                futures = [pool.submit(_solve, spec, name, ref, model, snapshot, device, solver) for name in todo]
                results = [f.result() for f in futures]
                for name, (perm, gain) in zip(todo, results):
                    dirty.discard(name)
                    solved += 1
                    if gain > 0:
                        perms[name] = perm
                        changed += 1
                        dirty |= neighbours[name]
                        # Norms do not change under permutation: ||A - pi B||^2 moves by -2 * gain.
                        dot += gain
                        sq -= 2 * gain
            stats = SweepStats(sweep, dot, changed, solved, math.sqrt(max(sq, 0.0)) / base, time.perf_counter() - t0)
            history.append(stats)
            if on_sweep is not None:
                on_sweep(stats)
            if changed == 0:
                converged = True
                break
    exact_dot, exact_sq = objective_and_distance(spec, ref, model, perms)
    return MatchResult(perms, history, converged, exact_dot, math.sqrt(exact_sq) / base)
