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
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from typing import Any

import numpy as np
import torch

from ..common.devices import ProductDevice, product_device
from ..common.memory import return_freed_memory, scratch
from ..common.workers import as_they_finish, worker_pool
from ..permutations import groups
from ..permutations.spec import (
    Permutations,
    PermutationSpec,
    identity_permutation,
    permute_tensor,
    take_along,
)
from .warm_start import invariant_feature_start

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
    identity_objective: float = math.nan
    """`<ref, model>` with no permutation applied (the model as given), from the same pass over the
    tensors that rates the starting points: MergeMany's first-visit gain needs it, and a pass of
    its own over an SD model costs seconds."""
    certified: int = 0
    """Spaces proved unmoved by the identity certificate's bound alone (`certify.py`; no product)."""
    exact_rows: int = 0
    """Spaces proved unmoved by the identity certificate with exact rows of the product."""
    searched: int = 0
    """Spaces solved by a full cost matrix and assignment at least once."""

    @property
    def final(self) -> SweepStats:
        return self.history[-1]


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


PRECISIONS = ("fp32", "bf16")
"""Matrix-product precision: `fp32` is exact for fp16/bf16 weights (their products are exact in
float32, summed in float32). `bf16` rounds the operands to bfloat16 and each slice's product to
bfloat16 too (torch has no bf16-in, fp32-out matmul on CPU), then adds slices and keys in float32:
about 1.5x faster sweeps on CPUs with bf16 units (SD1: 38 -> 25 s); near-ties between units may
then go the other way."""

CHUNK_ELEMENTS = 1 << 22
"""Elements per operand chunk (16 MiB in float32): products are built from slices of this size, so
the working memory of a product does not grow with the tensor (a 1280x2560x3x3 conv is 29 M)."""


def _product_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _as_matrix(part: torch.Tensor, dtype: torch.dtype, device: ProductDevice) -> torch.Tensor:
    """`part` as a contiguous `(len, -1)` matrix in `dtype` on `device`: one copy, any strides."""
    if device.offload:
        part = part.to(device.device)
    out = torch.empty(part.shape, dtype=dtype, device=part.device)
    out.copy_(part)
    return out.view(part.shape[0], -1)


def _paired_chunks(
    ref_value: torch.Tensor,
    model_value: torch.Tensor,
    axis: int,
    seg,
    dtype: torch.dtype,
    device: ProductDevice,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(a, b)` matrix pairs, `(m, k_i)` each, with `sum_i a_i @ b_i.T` = the segment's product.

    `a` and `b` slice `ref` and `model` at the segment's units along `axis`; slices run along the
    first other axis, so no full-size copy is ever made.
    """
    m = len(seg.units)
    a = ref_value.narrow(axis, seg.start, m).movedim(axis, 0)
    b = model_value.narrow(axis, seg.start, m).movedim(axis, 0)
    if a.dim() == 1:
        yield _as_matrix(a[:, None], dtype, device), _as_matrix(b[:, None], dtype, device)
        return
    width = a.shape[1]
    step = max(1, CHUNK_ELEMENTS // max(1, a[:, :1].numel()))
    for lo in range(0, width, step):
        yield _as_matrix(a[:, lo : lo + step], dtype, device), _as_matrix(b[:, lo : lo + step], dtype, device)


def _cost_matrix(
    spec: PermutationSpec,
    space: str,
    ref: Mapping[str, torch.Tensor],
    aligned: Mapping[str, torch.Tensor],
    applied: np.ndarray,
    device: ProductDevice,
    precision: str = "fp32",
) -> np.ndarray:
    """`C'[u, w] = sum over axes of <ref slice at unit u, aligned model slice at unit w>` (float64).

    `aligned` is the model with every current permutation applied, `space`'s own included, so
    this is `C[:, applied]` for the cost `C` of the original model's units (see `_solve`).
    Products run chunk by chunk on `device` in the precision's dtype and accumulate in float32
    (on the device, then copied back, when it is an accelerator: `ProductDevice.offload`).
    """
    n = spec.spaces[space].size
    dtype = _product_dtype(precision)
    if device.offload:
        cost = torch.zeros(n, n, dtype=torch.float32, device=device.device)
    else:
        cost = scratch("cost", (n, n), torch.float32).zero_()
    for key, axis, seg in spec.segments_of(space):
        if key not in ref or key not in aligned:
            continue
        m = len(seg.units)
        lo = int(seg.units[0])
        contiguous = np.array_equal(seg.units, np.arange(lo, lo + m))
        block = cost[lo : lo + m, lo : lo + m] if contiguous else torch.zeros(m, m, device=device.device)
        for a, b in _paired_chunks(ref[key], aligned[key], axis, seg, dtype, device):
            if dtype == torch.float32:
                block.addmm_(a, b.T)
            else:
                block += a @ b.T
        if not contiguous:
            units = torch.from_numpy(seg.units).to(device.device)
            cost.index_put_((units[:, None], units[None, :]), block, accumulate=True)
    return scratch("cost64", (n, n), torch.float64).copy_(cost).numpy()  # valid until this thread's next


def _solve(
    spec: PermutationSpec,
    space: str,
    ref: Mapping[str, torch.Tensor],
    aligned: Mapping[str, torch.Tensor],
    applied: np.ndarray,
    device: ProductDevice,
    solver: str | None,
    precision: str,
) -> tuple[np.ndarray, float]:
    """Best legal permutation of `space` with the others fixed, and its gain in the objective.

    With `C' = C[:, applied]`, `sum_u C[u, g(u)] = sum_u C'[u, h(u)]` for `g = applied o h`, and
    `h` ranges over the legal group as `g` does: so the assignment runs on `C'` as it comes
    (no column gather of a matrix that reaches 5120^2), and the current value is its trace.
    """
    cost = _cost_matrix(spec, space, ref, aligned, applied, device, precision)
    old_value = math.fsum(np.diagonal(cost))
    step = groups.best_element(spec.spaces[space].tree, cost, solver)
    new_value = math.fsum(cost[np.arange(len(step)), step])
    if new_value > old_value + IMPROVEMENT_TOLERANCE * max(1.0, abs(old_value)):
        return applied[step], new_value - old_value
    return applied, 0.0


class AlignedModel:
    """The model with the current permutations applied, kept up to date one changed space at a time.

    Products then read plain slices instead of gathering every other axis each time (gathers were
    a sixth of a sweep). `values` starts as the caller's tensors; a key is copied the first time
    one of its spaces moves, or, with `overwrite`, the caller's tensors are permuted in place (one
    model of memory saved, and no heap growth when the tensors were allocated by other threads).
    """

    def __init__(
        self,
        spec: PermutationSpec,
        model: Mapping[str, torch.Tensor],
        overwrite: bool = False,
        pool: Executor | None = None,
    ):
        self.spec = spec
        self.values: dict[str, torch.Tensor] = dict(model)
        self.overwrite = overwrite
        self.perms: Permutations = identity_permutation(spec)
        self.pool = pool
        """Keys are permuted in parallel on it (the gathers release the GIL)."""

    def move_to(self, perms: Permutations) -> None:
        """Apply the permutations of the spaces in `perms` (each relative to the original model)."""
        delta = {
            name: np.argsort(self.perms[name])[p]
            for name, p in perms.items()
            if not np.array_equal(p, self.perms[name])
        }
        keys = sorted({key for name in delta for key in self.spec.keys_of(name)} & self.values.keys())

        def permuted(key: str) -> torch.Tensor:
            value = permute_tensor(self.spec, key, self.values[key], delta)
            return self.values[key].copy_(value) if self.overwrite else value

        for key, value in zip(keys, self.pool.map(permuted, keys) if self.pool else map(permuted, keys)):
            self.values[key] = value
        for name in delta:
            self.perms[name] = perms[name].copy()


def _accurate_sum(x: torch.Tensor, row: int = 4096) -> float:
    """Sum in float32 over short rows, then in float64 across rows: fast and accurate to ~1e-7."""
    x = x.reshape(-1)
    head = x.numel() - x.numel() % row
    total = x[:head].view(-1, row).sum(dim=1).double().sum() if head else torch.zeros((), dtype=torch.float64)
    return float(total + x[head:].double().sum())


def slice_dot(a: torch.Tensor, b: torch.Tensor, rows: int = 1 << 22) -> float:
    """`<a, b>` in float32 slices summed in float64 (no full-size float32 temporary)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return math.fsum(
        _accurate_sum(a[lo : lo + rows].float() * b[lo : lo + rows].float())
        for lo in range(0, a.numel(), rows)
    )


def objective_and_distance(
    spec: PermutationSpec,
    ref: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    perms: Permutations,
) -> tuple[float, float]:
    """`(sum_k <ref_k, pi(model_k)>, sum_k ||ref_k - pi(model_k)||^2)` over the spec's keys.

    In float32 slices of at most `CHUNK_ELEMENTS` (products of fp16 values are exact in float32).
    """
    return objectives_and_distances(spec, ref, model, [perms])[0]


def objectives_and_distances(
    spec: PermutationSpec,
    ref: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    candidates: list[Permutations],
    on_key: Callable[[], None] | None = None,
) -> list[tuple[float, float]]:
    """`objective_and_distance` for several candidate permutations in one pass over the tensors.

    `on_key()` is called after each key of the spec that both models hold (progress)."""
    totals = [[0.0, 0.0] for _ in candidates]
    for key in spec.axes:
        if key not in ref or key not in model:
            continue
        a_full, b_full = ref[key], model[key]
        if a_full.dim() == 0:
            a_full, b_full = a_full[None], b_full[None]
        step = max(1, CHUNK_ELEMENTS // max(1, a_full[:1].numel()))
        gathers = [
            {
                axis: index
                for axis in spec.axes[key]
                if (index := spec.gather_index(key, axis, perms)) is not None
            }
            for perms in candidates
        ]
        for lo in range(0, a_full.shape[0], step):
            a = a_full[lo : lo + step].float()
            for total, gather in zip(totals, gathers):
                if 0 in gather:  # this chunk's rows, gathered from anywhere in the tensor
                    b = take_along(b_full, gather | {0: gather[0][lo : lo + step]})
                else:
                    b = take_along(b_full[lo : lo + step], gather) if gather else b_full[lo : lo + step]
                b = b.float()
                total[0] += _accurate_sum(a * b)
                total[1] += _accurate_sum((b - a).square_())
        if on_key is not None:
            on_key()
    return [(dot, sq) for dot, sq in totals]


def _batches(order: list[str], neighbours: Mapping[str, set[str]]) -> list[list[str]]:
    """Split the visiting order into runs of permutations that pairwise share no tensor."""
    out: list[list[str]] = []
    current: list[str] = []
    blocked: set[str] = set()
    for name in order:
        if name in blocked:
            out.append(current)
            current, blocked = [], set()
        current.append(name)
        blocked |= neighbours[name] | {name}
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
    device: str | torch.device | ProductDevice = "cpu",
    solver: str | None = None,
    precision: str = "fp32",
    init: Permutations | None = None,
    warm_start: bool = True,
    overwrite_model: bool = False,
    on_sweep: Callable[[SweepStats], None] | None = None,
    on_progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> MatchResult:
    """Find the permutations of `model` that bring it closest to `ref` (legal ones only).

    `apply_permutation(spec, result.perms, model)` is `model` aligned to `ref`. Tensors may be
    fp16/bf16/fp32; `precision` picks how products are computed (see `PRECISIONS`), and cost
    matrices are handed to the solver in float64. `device` is where the products run ("cpu",
    "cuda", ...; see `common.devices`); the assignments always run on CPU threads (a GPU's float32
    sums may round differently, so near-equal units may then pair the other way). `threads=None`
    uses every CPU; the result is bit-identical for any thread count with the same seed. `init` starts from
    given permutations instead of the identity; `warm_start` first tries the invariant-feature
    start (see `warm_start.py`) and keeps it only if its objective beats the starting point's.
    `overwrite_model` lets matching permute `model`'s tensors in place instead of holding a
    permuted copy: they then hold the aligned model. `on_sweep(stats)` follows each sweep;
    `on_progress(event, data)` receives the "phase_start" / "phase" / "phase_end" events of the
    starting point (phase "start") and each sweep's "sweep_start" and "solve" events, as
    `events.py` describes them (a few per permutation solved, never per element).
    """
    device = product_device(device)
    _product_dtype(precision)  # reject an unknown precision before any work
    threads = threads or default_threads()
    start = {name: p.copy() for name, p in (init or {}).items()}
    for name in spec.spaces:
        start.setdefault(name, groups.identity(spec.spaces[name].tree))
    rng = np.random.default_rng(seed)
    names = sorted(spec.spaces)
    neighbours = {name: spec.neighbours(name) for name in names}
    t0 = time.perf_counter()
    report = on_progress or (lambda event, data: None)
    use_warm = warm_start and max_iter > 0
    both = sum(1 for key in spec.axes if key in ref and key in model)
    steps = {"done": 0}

    def step() -> None:  # one key's features, one space's solve, or one key's objectives
        steps["done"] += 1
        report("phase", {"phase": "start", "done": steps["done"]})

    total = both * 2 + len(names) if use_warm else both  # features, solves, then objectives
    report("phase_start", {"phase": "start", "total": total, "unit": "step"})
    warm = None
    if use_warm:  # from the untouched model: its features do not depend on `start`
        warm = invariant_feature_start(spec, ref, model, start, threads=threads, solver=solver, on_step=step)
        return_freed_memory()
    with worker_pool(threads) as pool:  # solves, and the gathers of `move_to`
        aligned = AlignedModel(spec, model, overwrite=overwrite_model, pool=pool)
        moved_start = any(not np.array_equal(p, np.arange(len(p))) for p in start.values())
        candidates = [{}, start] if moved_start else [{}]
        if warm is not None and all(np.array_equal(warm[name], start[name]) for name in names):
            warm = None  # the starting point itself (fine-tunes of one base): nothing more to rate
        if warm is not None:  # kept only if it is a better starting point
            candidates.append(warm)
        figures = objectives_and_distances(spec, ref, model, candidates, on_key=step)  # one pass for all
        base = math.sqrt(figures[0][1]) if figures[0][1] > 0 else 1.0
        identity = figures[0][0]
        warm_figures = figures.pop() if warm is not None else None
        dot, sq = figures[-1]  # the start's
        if warm_figures is not None and warm_figures[0] > dot:
            dot, sq = warm_figures
            aligned.move_to(warm)
        else:
            aligned.move_to(start)
        history = [SweepStats(0, dot, 0, 0, math.sqrt(sq) / base, time.perf_counter() - t0)]
        report("phase_end", {"phase": "start"})
        dirty = set(names)

        searched: set[str] = set()

        def solve(name: str) -> tuple[np.ndarray, float]:  # against the model as aligned so far
            searched.add(name)
            return _solve(spec, name, ref, aligned.values, aligned.perms[name], device, solver, precision)

        converged = False
        moved = False
        for sweep in range(1, max_iter + 1):
            t0 = time.perf_counter()
            order = [names[i] for i in rng.permutation(len(names))]
            changed = solved = visited = 0
            report("sweep_start", {"sweep": sweep, "total": len(names), "objective": dot})
            for batch in _batches(order, neighbours):
                todo = [name for name in batch if name in dirty]
                visited += len(batch) - len(todo)  # unchanged neighbours: nothing to solve

                results: list[Any] = [None] * len(todo)
                for i, result in as_they_finish(pool, solve, todo):  # progress as solves finish
                    results[i] = result
                    visited += 1
                    report("solve", {"sweep": sweep, "done": visited, "total": len(names), "objective": dot})
                updates = {}
                for name, (perm, gain) in zip(todo, results):
                    dirty.discard(name)
                    solved += 1
                    if gain > 0:
                        updates[name] = perm
                        changed += 1
                        dirty |= neighbours[name]
                        # Norms do not change under permutation: ||A - pi B||^2 moves by -2 * gain.
                        dot += gain
                        sq -= 2 * gain
                aligned.move_to(updates)
                moved = moved or bool(updates)
            stats = SweepStats(
                sweep, dot, changed, solved, math.sqrt(max(sq, 0.0)) / base, time.perf_counter() - t0
            )
            history.append(stats)
            if on_sweep is not None:
                on_sweep(stats)
            if changed == 0:
                converged = True
                break
    if moved:  # the final figures recomputed from the tensors, not from the tracked gains
        dot, sq = objective_and_distance(spec, ref, aligned.values, {})
    return MatchResult(
        aligned.perms, history, converged, dot, math.sqrt(sq) / base, identity, searched=len(searched)
    )
