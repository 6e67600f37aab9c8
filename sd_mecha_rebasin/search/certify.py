"""A proof that weight matching's answer is "nothing moves", at the cost of one read of the model.

In MergeMany's all-others pass each model is matched against the weighted mean of the others.
For fine-tunes of one base the answer is the identity, and weight matching pays a full set of
matrix products (one `n x n` product per space) to confirm it. The identity is the unique
optimum of a space's assignment when every row of its cost matrix `C` has its strict maximum on
the diagonal (the sum of the row maxima bounds every assignment and only the identity reaches
it; the legal subgroup contains the identity, so the same holds there).

The bound (Cauchy-Schwarz around a centre shared by every model of the pass): with `R = g S`
the pass-start weighted mean and `G = R R^T` (one product per space per pass, `PassCentre`),
the target `T = R + a` and the model `M = R + b` give, off the diagonal,
`C[u, v] = G[u, v] + <R_u, b_v> + <a_u, R_v> + <a_u, b_v>`
`       <= max_{v != u} G[u, v] + |R_u| max|b| + |a_u| max|R| + |a_u| max|b|`,
and the diagonal `<T_u, M_u>` comes from one pass over the model. Only each row's largest
off-diagonal `G` entry is kept (O(n) memory). A row the bound cannot clear gets its exact row of
the product; a space where an exact row peaks off the diagonal gets weight matching's own solve.

`certified_alignment` is weight matching's first alignment of a model in its own basis, fused into
that one read: the invariant-feature start (the same features and cost matrices; an assignment
only where the identity is not certain), the objective of the start, and the certificate for each
space. Where the warm start or a space would move the model it returns None and the caller runs
weight matching itself, so the answer is always weight matching's.

Floating point: weight matching's cost matrix is a float32 sum (`matching._cost_matrix`), within
`gamma ||T_u|| ||M_v||` of the exact one (`product_error`); every comparison keeps that margin and
the rounding of this module's own sums, so where this module says "identity", weight matching's
products say so too. More in docs/many.md.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor

import numpy as np
import torch

from ..common.devices import product_device
from ..common.memory import return_freed_memory
from ..permutations import groups
from ..permutations.spec import PermutationSpec, identity_permutation
from .matching import (
    CHUNK_ELEMENTS,
    MatchResult,
    SweepStats,
    _accurate_sum,
    _paired_chunks,
    _solve,
    objectives_and_distances,
    slice_dot,
)
from .warm_start import _space_cost, diagonal_certain, key_features

U32 = 2.0**-24
"""float32's unit roundoff."""

REDUCED_PRECISION_ERROR = 4 * 2.0**-8
"""Relative error added for bf16 products or an accelerator's float32 (TF32 rounds operands to
10 bits): operand rounding on both sides and the rounding of each slice's product, generously."""

ROW_ELEMENTS = 1 << 22
"""Elements per slice of the per-unit sums."""

MAX_EXACT_ROW_FRACTION = 1 / 16
"""A space with more rows than this fraction (and more than `MIN_EXACT_ROWS`) that the bound
cannot clear goes to weight matching's solve: each exact row costs a row of the product."""

MIN_EXACT_ROWS = 8

SLACK = 1e-9
"""Relative slack on every comparison, above the float64 rounding of this module's sums."""

BOUND, ROWS, SEARCH = "bound", "rows", "search"
"""How a space was decided: the bound alone, exact rows, or weight matching's solve."""

SUMS = ("dot", "tt", "mm", "aa", "bb")
"""Per unit: `<T_u, M_u>`, `|T_u|^2`, `|M_u|^2`, `|T_u - R_u|^2`, `|M_u - R_u|^2`."""


def product_error(spec: PermutationSpec, space: str, precision: str = "fp32", device: str = "cpu") -> float:
    """`gamma` with `|C_float[u, v] - <T_u, M_v>| <= gamma ||T_u|| ||M_v||` for `_cost_matrix`.

    A float32 sum of K terms in any order is within `(K - 1) u sum |terms|` of the exact sum, and
    `sum |T_u,i M_v,i| <= ||T_u|| ||M_v||`. `_cost_matrix` sums each slice's products (its inner
    length) and then adds slices and segments into the block: the chain is at most the longest
    slice plus the number of slices, plus one rounding per float32 product.
    """
    longest, slices = 1, 0
    for key, axis, seg in spec.segments_of(space):
        shape = list(spec.shapes[key])
        m = len(seg.units)
        rest = shape[:axis] + shape[axis + 1 :]
        if not rest:
            slices += 1
            continue
        width, per_column = rest[0], math.prod(rest[1:])
        step = max(1, CHUNK_ELEMENTS // max(1, m * per_column))
        longest = max(longest, min(step, width) * per_column)
        slices += -(-width // step)
    gamma = (longest + slices + 2) * U32 * 1.01
    reduced = torch.get_float32_matmul_precision() != "highest"  # float32 products may use bf16/TF32
    if precision != "fp32" or torch.device(device).type != "cpu" or reduced:
        gamma += REDUCED_PRECISION_ERROR
    return gamma


def _max_excluding_self(x: np.ndarray) -> np.ndarray:
    """`out[u] = max_{v != u} x[v]` (0 for a single unit)."""
    if len(x) < 2:
        return np.zeros_like(x)
    top = int(np.argmax(x))
    out = np.full_like(x, x[top])
    out[top] = np.max(np.delete(x, top))
    return out


def _unit_rows(value: torch.Tensor, axis: int, start: int, m: int) -> torch.Tensor:
    """The segment's `m` units along `axis` as rows, `(m, rest)` (a copy when not contiguous)."""
    return value.narrow(axis, start, m).movedim(axis, 0).reshape(m, -1)


class PassCentre:
    """The centre `R = g S` of one all-others pass and, per space, what the bound needs of `G = R R^T`:
    each row's largest off-diagonal entry and each unit's norm. Built on first use (one product
    per space: about one weight-matching sweep), shared by every model of the pass.
    """

    def __init__(self, spec: PermutationSpec, total: Mapping[str, torch.Tensor], scale: float):
        self.spec, self.total, self.scale = spec, total, scale
        self.row_max: dict[str, np.ndarray] = {}
        """Per space: `max_{v != u} G'[u, v]`, `G' = S S^T` as float32 products (unscaled)."""
        self.norms: dict[str, np.ndarray] = {}
        """Per space: an upper bound of `||S_u||`."""
        self.error: dict[str, float] = {}
        """Per space: `product_error` of the float32 products that built `G'`."""
        self.built = False
        self.seconds = 0.0

    def build(self, pool: Executor) -> None:
        if self.built:
            return
        t0 = time.perf_counter()
        device = product_device("cpu")
        names = [name for name in self.spec.spaces if any(k in self.total for k in self.spec.keys_of(name))]

        def one(name: str) -> tuple[str, np.ndarray, np.ndarray, float]:
            gram = _gram(self.spec, name, self.total, device)
            gamma = product_error(self.spec, name)
            norms = np.sqrt(np.maximum(np.diagonal(gram), 0.0) / (1.0 - gamma))
            np.fill_diagonal(gram, -np.inf)
            row_max = gram.max(axis=1) if len(gram) > 1 else np.zeros(1)
            return name, row_max, norms, gamma

        for name, row_max, norms, gamma in pool.map(one, names):
            self.row_max[name], self.norms[name], self.error[name] = row_max, norms, gamma
        return_freed_memory()
        self.built = True
        self.seconds = time.perf_counter() - t0


GRAM_BLOCK = 512
"""Rows per block of `_gram`: only blocks on or above the diagonal are multiplied (the rest is
their transpose), which saves up to half the products at SD widths."""


def _gram(spec: PermutationSpec, space: str, total: Mapping[str, torch.Tensor], device) -> np.ndarray:
    """`S S^T` over the space's slices (float64 copy of float32 sums), with the slices and the
    float32 accumulation of `_cost_matrix` (so `product_error` bounds it), symmetric blocks once."""
    n = spec.spaces[space].size
    gram = torch.zeros(n, n, dtype=torch.float32)
    for key, axis, seg in spec.segments_of(space):
        if key not in total:
            continue
        m = len(seg.units)
        block = torch.zeros(m, m, dtype=torch.float32)
        cuts = list(range(0, m, GRAM_BLOCK)) + [m]
        for a, _ in _paired_chunks(total[key], total[key], axis, seg, torch.float32, device):
            for i, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
                for lo2, hi2 in list(zip(cuts, cuts[1:]))[i:]:
                    block[lo:hi, lo2:hi2].addmm_(a[lo:hi], a[lo2:hi2].T)
        for i, (lo, hi) in enumerate(zip(cuts, cuts[1:])):  # the blocks below the diagonal
            for lo2, hi2 in list(zip(cuts, cuts[1:]))[i + 1 :]:
                block[lo2:hi2, lo:hi] = block[lo:hi, lo2:hi2].T
        units = torch.from_numpy(seg.units)
        gram.index_put_((units[:, None], units[None, :]), block, accumulate=True)
    return gram.double().numpy()


class _Lazy(Mapping[str, torch.Tensor]):
    """`{key: read(key)}` over `keys`, computed when a key is read."""

    def __init__(self, keys: list[str], read: Callable[[str], torch.Tensor]):
        self.keys_, self.known, self.read = keys, set(keys), read

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.known:
            raise KeyError(key)
        return self.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)

    def __contains__(self, key: object) -> bool:
        return key in self.known


@dataclasses.dataclass
class Certified:
    """A `certified_alignment` that stayed at the identity."""

    result: MatchResult
    """What `weight_matching(target, model, warm_start=True, max_iter=...)` returns for it."""
    target_norm: float
    """`||S - alpha M||^2` (the target before its scale)."""
    model_norm: float
    """`||M||^2`."""
    decided: dict[str, str]
    """Space -> BOUND / ROWS / SEARCH."""


@dataclasses.dataclass
class _KeyPass:
    target_norm: float
    model_norm: float
    features: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]
    chunks: list[tuple[float, float]]
    units: list[tuple[str, np.ndarray, dict[str, np.ndarray]]]


def certified_alignment(
    spec: PermutationSpec,
    total: Mapping[str, torch.Tensor],
    read_model: Callable[[str], torch.Tensor],
    alpha: float,
    factor: float,
    centre: PassCentre,
    pool: Executor,
    *,
    precision: str = "fp32",
    device: str = "cpu",
    solver: str | None = None,
) -> Certified | None:
    """Weight matching of a model in its own basis against `factor * (S - alpha * M)`, decided in one
    read of the model where its answer is the identity; None where it may not be (the caller then
    runs `weight_matching`, which gives the answer).

    `total` is `S`, the pass-start sum over the spec's keys (`centre.total`), left as it is;
    `read_model(key)` returns the model's tensor as weight matching would see it (same dtype);
    the target is computed as the running-sum update computes it (`S.clone().add_(M, alpha=-alpha)`,
    then times `factor`), so every figure is the one weight matching reports (one sweep, the
    starting point's objective and distance). Memory: a few keys at a time, never a whole model.
    """
    t0 = time.perf_counter()
    keys = [k for k in spec.axes if k in total]
    g = centre.scale

    def target_of(key: str, model_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unscaled = total[key] if alpha == 0 else total[key].clone().add_(model_value, alpha=-alpha)
        return unscaled, unscaled if factor == 1.0 else unscaled * factor

    def one(key: str) -> _KeyPass:
        m_full = read_model(key)
        unscaled, t_full = target_of(key, m_full)
        s_full = total[key]
        out = _KeyPass(
            slice_dot(unscaled, unscaled),
            slice_dot(m_full, m_full),
            (key_features(spec, key, t_full), key_features(spec, key, m_full)),
            _identity_chunks(t_full, m_full),
            [],
        )
        del unscaled
        if t_full.dim() == 0:
            t_full, m_full, s_full = t_full[None], m_full[None], s_full[None]
        for axis, segments in spec.axes[key].items():
            for seg in segments:
                out.units.append((seg.space, seg.units, _unit_sums(t_full, m_full, s_full, g, axis, seg)))
        return out

    passes = dict(zip(keys, pool.map(one, keys)))
    return_freed_memory()
    target_norm = math.fsum(p.target_norm for p in passes.values())
    model_norm = math.fsum(p.model_norm for p in passes.values())
    dot = sq = 0.0  # in weight matching's order: keys as the spec lists them, slices in order
    for key in spec.axes:
        if key in passes:
            for d, s in passes[key].chunks:
                dot += d
                sq += s
    base = math.sqrt(sq) if sq > 0 else 1.0

    def target(key: str) -> torch.Tensor:
        return target_of(key, read_model(key))[1]

    lazy_target, lazy_model = _Lazy(keys, target), _Lazy(keys, read_model)

    # The invariant-feature start (weight_matching's warm start), from the same features.
    features = {key: p.features for key, p in passes.items()}
    names = sorted(spec.spaces)

    def warm_of(name: str) -> np.ndarray:
        start = groups.identity(spec.spaces[name].tree)
        cost = _space_cost(spec, name, features)
        if cost is None or diagonal_certain(cost):
            return start
        return groups.best_element(spec.spaces[name].tree, cost, solver)

    warm = dict(zip(names, pool.map(warm_of, names)))
    if not all(np.array_equal(p, np.arange(len(p))) for p in warm.values()):
        ((warm_dot, _),) = objectives_and_distances(spec, lazy_target, lazy_model, [warm])
        if warm_dot > dot:  # weight matching starts from there: let it run
            return None
    history = [SweepStats(0, dot, 0, 0, math.sqrt(sq) / base, time.perf_counter() - t0)]

    # Sweep 1 from the identity: every space must keep it.
    t1 = time.perf_counter()
    sums: dict[str, dict[str, np.ndarray]] = {
        name: {f: np.zeros(space.size) for f in SUMS} for name, space in spec.spaces.items()
    }
    for key in keys:  # in key order: the sums do not depend on the thread count
        for name, units, values in passes[key].units:
            for field, value in values.items():
                np.add.at(sums[name][field], units, value)
    del passes
    centre.build(pool)
    product = product_device(device)

    def decide(name: str) -> str:
        verdict = _decide(spec, name, sums[name], centre, lazy_target, lazy_model, precision, device)
        if verdict == SEARCH:
            size = spec.spaces[name].size
            _, gain = _solve(spec, name, lazy_target, lazy_model, np.arange(size), product, solver, precision)
            if gain > 0:
                return "moves"
        return verdict

    decided = dict(zip(names, pool.map(decide, names)))
    return_freed_memory()
    if "moves" in decided.values():
        return None
    history.append(SweepStats(1, dot, 0, len(names), math.sqrt(sq) / base, time.perf_counter() - t1))
    counts = {v: sum(1 for d in decided.values() if d == v) for v in (BOUND, ROWS, SEARCH)}
    result = MatchResult(
        identity_permutation(spec),
        history,
        True,
        dot,
        math.sqrt(sq) / base,
        dot,
        counts[BOUND],
        counts[ROWS],
        counts[SEARCH],
    )
    return Certified(result, target_norm, model_norm, decided)


def _identity_chunks(a_full: torch.Tensor, b_full: torch.Tensor) -> list[tuple[float, float]]:
    """Per slice, `(<a, b>, ||b - a||^2)` exactly as `objectives_and_distances` sums them for the
    identity (same slices, same float32 sums), to be added in its order."""
    if a_full.dim() == 0:
        a_full, b_full = a_full[None], b_full[None]
    step = max(1, CHUNK_ELEMENTS // max(1, a_full[:1].numel()))
    out = []
    for lo in range(0, a_full.shape[0], step):
        a = a_full[lo : lo + step].float()
        b = b_full[lo : lo + step].float()
        out.append((_accurate_sum(a * b), _accurate_sum((b - a).square_())))
    return out


def _unit_sums(
    t_full: torch.Tensor, m_full: torch.Tensor, s_full: torch.Tensor, g: float, axis: int, seg
) -> dict[str, np.ndarray]:
    """`SUMS` for the segment's units, in float32 (row dot products); `own_error` bounds them."""
    m = len(seg.units)
    t, mm, s = (_unit_rows(x, axis, seg.start, m) for x in (t_full, m_full, s_full))
    rows = max(1, ROW_ELEMENTS // max(1, t.shape[1]))
    parts: dict[str, list[np.ndarray]] = {f: [] for f in SUMS}

    def rowdot(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        return torch.einsum("ij,ij->i", x, y).double().numpy()

    for lo in range(0, m, rows):
        tc, mc = t[lo : lo + rows].float(), mm[lo : lo + rows].float()  # may be the caller's tensors
        rc = s[lo : lo + rows].to(torch.float32, copy=True).mul_(g)
        parts["dot"].append(rowdot(tc, mc))
        parts["tt"].append(rowdot(tc, tc))
        parts["mm"].append(rowdot(mc, mc))
        a = tc - rc
        parts["aa"].append(rowdot(a, a))
        del a
        b = rc.sub_(mc)
        parts["bb"].append(rowdot(b, b))
    return {f: np.concatenate(p) for f, p in parts.items()}


def own_error(spec: PermutationSpec, space: str) -> float:
    """Relative error bound of `_unit_sums`: a float32 row sum of L terms (any order) is within
    `(L - 1) u sum |terms|`, each term (a product, or the square of a rounded difference) carries
    `u` more, and the float64 sums over segments add nothing that counts."""
    longest = max(
        (math.prod(spec.shapes[key]) // spec.shapes[key][axis] for key, axis, _ in spec.segments_of(space)),
        default=1,
    )
    return (longest + 3) * U32 * 1.01


def space_verdict(
    spec: PermutationSpec,
    space: str,
    target: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    centre: PassCentre,
    pool: Executor,
    precision: str = "fp32",
    device: str = "cpu",
) -> str:
    """BOUND, ROWS or SEARCH for one space of `target` against `model` (the other spaces at the
    identity), as `certified_alignment` decides it: for tests and diagnostics."""
    centre.build(pool)
    sums = {f: np.zeros(spec.spaces[space].size) for f in SUMS}
    for key, axis, seg in spec.segments_of(space):
        if key in target:
            t_full, m_full, s_full = target[key], model[key], centre.total[key]
            if t_full.dim() == 0:
                t_full, m_full, s_full = t_full[None], m_full[None], s_full[None]
            for field, value in _unit_sums(t_full, m_full, s_full, centre.scale, axis, seg).items():
                np.add.at(sums[field], seg.units, value)
    return _decide(spec, space, sums, centre, target, model, precision, device)


def _decide(
    spec: PermutationSpec,
    space: str,
    sums: dict[str, np.ndarray],
    centre: PassCentre,
    target: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    precision: str,
    device: str,
) -> str:
    """BOUND, ROWS or SEARCH for one space (see the module docstring).

    The sums are float32 (`own_error`); `T - R` also carries the rounding of `R = g S` and of the
    difference (at most `u |R| + u |T - R|` per element): the norms are inflated and the diagonal
    lowered accordingly.
    """
    if space not in centre.row_max:  # no tensor of this space in the models
        return BOUND
    n = spec.spaces[space].size
    if n == 1:
        return BOUND
    g = centre.scale
    gamma = product_error(spec, space, precision, device)
    own = own_error(spec, space)
    inflate = 1.0 / (1.0 - own)
    tn, mn = np.sqrt(np.maximum(sums["tt"], 0.0) * inflate), np.sqrt(np.maximum(sums["mm"], 0.0) * inflate)
    rn = g * centre.norms[space] * (1 + 4 * U32)
    an = (np.sqrt(np.maximum(sums["aa"], 0.0) * inflate) + 2 * U32 * rn) / (1 - U32)
    bn = (np.sqrt(np.maximum(sums["bb"], 0.0) * inflate) + 2 * U32 * rn) / (1 - U32)
    lower = sums["dot"] - (gamma + own) * tn * mn
    sn = centre.norms[space]
    upper = (
        g * g * (centre.row_max[space] + centre.error[space] * sn * _max_excluding_self(sn))
        + rn * _max_excluding_self(bn)
        + an * _max_excluding_self(rn)
        + an * _max_excluding_self(bn)
        + gamma * tn * _max_excluding_self(mn)
    )
    scale = np.abs(lower) + np.abs(upper) + tn * mn
    clear = lower > upper + SLACK * scale
    if clear.all():
        return BOUND
    failing = np.flatnonzero(~clear)
    if len(failing) > max(MIN_EXACT_ROWS, int(n * MAX_EXACT_ROW_FRACTION)):
        return SEARCH
    rows = _exact_rows(spec, space, failing, target, model)  # <T_u, M_v>, float64 sums
    rows += (gamma + 2 * U32) * tn[failing, None] * mn[None, :]
    rows[np.arange(len(failing)), failing] = -np.inf
    best = rows.max(axis=1)
    margin = SLACK * (np.abs(lower[failing]) + np.abs(best) + tn[failing] * mn.max())
    return ROWS if bool((lower[failing] > best + margin).all()) else SEARCH


def _exact_rows(
    spec: PermutationSpec,
    space: str,
    units: np.ndarray,
    target: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
) -> np.ndarray:
    """`<T_u, M_v>` for the rows `units` and every v, in float64 (exact products of float32 values)."""
    n = spec.spaces[space].size
    out = np.zeros((len(units), n))
    wanted = np.full(n, -1, dtype=np.int64)
    wanted[units] = np.arange(len(units))
    for key, axis, seg in spec.segments_of(space):
        if key not in target:
            continue
        local = wanted[seg.units]
        picked = np.flatnonzero(local >= 0)
        if len(picked) == 0:
            continue
        m = len(seg.units)
        t_full, m_full = target[key], model[key]
        if t_full.dim() == 0:
            t_full, m_full = t_full[None], m_full[None]
        t = _unit_rows(t_full, axis, seg.start, m)[torch.from_numpy(picked)].double()
        mm = _unit_rows(m_full, axis, seg.start, m)
        width = max(1, ROW_ELEMENTS // max(1, m))
        block = torch.zeros(len(picked), m, dtype=torch.float64)
        for lo in range(0, t.shape[1], width):
            block.addmm_(t[:, lo : lo + width], mm[:, lo : lo + width].double().T)
        np.add.at(out, (local[picked][:, None], seg.units[None, :]), block.numpy())
    return out
