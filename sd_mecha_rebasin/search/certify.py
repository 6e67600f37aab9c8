"""A proof that weight matching's answer is "nothing moves", without weight matching's products.

In MergeMany's all-others pass, model m is matched against the weighted mean of the others. For
fine-tunes of one base the answer is the identity, and weight matching pays a full set of
matrix products (one `n x n` product per space, the bulk of an alignment) to confirm it. The
identity is the unique optimum of a space's assignment when every row of its cost matrix `C`
has its strict maximum on the diagonal: the sum of the row maxima bounds every assignment and
the identity reaches it (over the legal subgroup too, which contains the identity). So weight
matching's first sweep changes nothing, and the alignment ends where it started.

The bound (Cauchy-Schwarz around a centre shared by all models of the pass): with `R = g S`
the pass-start weighted mean (`S` the running sum) and `G = R R^T` computed once per pass, the
target `T` and model `M` are `R + a` and `R + b`, so off the diagonal
`C[u, v] = G[u, v] + <R_u, b_v> + <a_u, R_v> + <a_u, b_v>`
`       <= max_{v != u} G[u, v] + |R_u| max|b| + |a_u| max|R| + |a_u| max|b|`,
while the diagonal `<T_u, M_u>` is computed exactly (float64) in one pass over the model. Only a
per-row maximum of `G` is kept (O(n) memory per space). A row the bound cannot clear gets its
exact row of the product (one row's cost); a space with a row whose exact maximum is off the
diagonal is left to weight matching's own product and assignment (`weight_matching` then solves
it as it always does).

Floating point: the cost matrix weight matching would compute is a float32 sum (`_cost_matrix`).
Its error is at most `gamma ||T_u|| ||M_v||` (`product_error`: the longest chain of float32
additions times the unit roundoff, plus operand rounding for bf16 or an accelerator); every
comparison keeps that margin on both sides, so where this module says "identity", weight
matching's own products would have said so too. Details: docs/many.md.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor

import numpy as np
import torch

from ..common.workers import worker_pool
from ..permutations.spec import PermutationSpec

UNIT_ROUNDOFF_FP32 = 2.0**-24
REDUCED_PRECISION_ERROR = 4 * 2.0**-8
"""Relative error added for bf16 products or an accelerator's float32 (TF32 rounds operands to
10 bits): operand rounding on both sides and the rounding of each slice's product, generously."""

CHUNK_ELEMENTS = 1 << 22
"""Elements per slice of the float64 row sums (32 MiB in float64)."""

MAX_EXACT_ROW_FRACTION = 1 / 16
"""A space with more rows than this fraction (and more than `MIN_EXACT_ROWS`) that the bound
cannot clear is left to the full product: exact rows cost a product row each."""

MIN_EXACT_ROWS = 8

SLACK = 1e-12
"""Relative slack on top of the float32 margins, for the float64 sums of this module."""

BOUND, ROWS, SEARCH = "bound", "rows", "search"
"""How a space was decided: the bound alone, exact rows, or weight matching's full product."""


def product_error(spec: PermutationSpec, space: str, precision: str = "fp32", device: str = "cpu") -> float:
    """`gamma` with `|C_float[u, v] - <T_u, M_v>| <= gamma ||T_u|| ||M_v||` for `_cost_matrix`.

    A float32 sum of K terms in any order is within `(K - 1) u sum |terms|` of the exact sum, and
    `sum |T_u,i M_v,i| <= ||T_u|| ||M_v||`. `_cost_matrix` sums each slice's products (its inner
    length) and then adds slices and segments into the block: the chain is at most the longest
    slice plus the number of slices, plus one rounding per float32 product.
    """
    from .matching import CHUNK_ELEMENTS as PRODUCT_CHUNK

    longest, slices = 1, 0
    for key, axis, seg in spec.segments_of(space):
        shape = list(spec.shapes[key])
        m = len(seg.units)
        rest = shape[:axis] + shape[axis + 1 :]
        if not rest:
            longest, slices = max(longest, 1), slices + 1
            continue
        width, per_column = rest[0], math.prod(rest[1:])
        step = max(1, PRODUCT_CHUNK // max(1, m * per_column))
        longest = max(longest, min(step, width) * per_column)
        slices += -(-width // step)
    gamma = (longest + slices + 2) * UNIT_ROUNDOFF_FP32 * 1.01
    if precision != "fp32" or torch.device(device).type != "cpu":
        gamma += REDUCED_PRECISION_ERROR
    return gamma


def _max_excluding_self(x: np.ndarray) -> np.ndarray:
    """`out[u] = max_{v != u} x[v]` (0 for a single unit)."""
    if len(x) < 2:
        return np.zeros_like(x)
    top = int(np.argmax(x))
    first = x[top]
    second = np.max(np.delete(x, top))
    out = np.full_like(x, first)
    out[top] = second
    return out


def _unit_rows(value: torch.Tensor, axis: int, start: int, m: int) -> torch.Tensor:
    """The segment's `m` units along `axis` as rows, `(m, rest)` (a copy when not contiguous)."""
    part = value.narrow(axis, start, m).movedim(axis, 0)
    return part.reshape(m, -1)


class PassCentre:
    """The centre `R = g S` of one all-others pass and, per space, what the bound needs of `G = R R^T`:
    the largest off-diagonal entry of each row, and each unit's norm. Built on first use (one
    product per space, the cost of one weight-matching sweep), shared by every model of the pass.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        total: Mapping[str, torch.Tensor],
        scale: float,
        threads: int,
        device: str = "cpu",
    ):
        self.spec, self.total, self.scale, self.threads, self.device = spec, total, scale, threads, device
        self.row_max: dict[str, np.ndarray] = {}
        """Per space: `max_{v != u} G'[u, v]` (float32 products of `S`, unscaled)."""
        self.norms: dict[str, np.ndarray] = {}
        """Per space: an upper bound of `||S_u||`."""
        self.error: dict[str, float] = {}
        """Per space: `product_error` of the products that built `G'` (fp32, on the CPU)."""
        self.built = False
        self.seconds = 0.0

    def build(self, on_space: Callable[[], None] | None = None) -> None:
        import time

        from ..common.devices import product_device
        from .matching import _cost_matrix

        if self.built:
            return
        t0 = time.perf_counter()
        device = product_device("cpu")
        names = [name for name in self.spec.spaces if any(True for _ in self._present(name))]

        def one(name: str) -> tuple[str, np.ndarray, np.ndarray, float]:
            n = self.spec.spaces[name].size
            cost = _cost_matrix(self.spec, name, self.total, self.total, np.arange(n), device, "fp32")
            gamma = product_error(self.spec, name)
            diagonal = np.diagonal(cost).copy()
            norms = np.sqrt(np.maximum(diagonal, 0.0) / (1.0 - gamma))
            np.fill_diagonal(cost, -np.inf)
            row_max = cost.max(axis=1) if n > 1 else np.zeros(1)
            return name, row_max, norms, gamma

        with worker_pool(self.threads) as pool:
            for name, row_max, norms, gamma in pool.map(one, names):
                self.row_max[name], self.norms[name], self.error[name] = row_max, norms, gamma
                if on_space is not None:
                    on_space()
        self.built = True
        self.seconds = time.perf_counter() - t0

    def _present(self, name: str):
        return ((k, a, s) for k, a, s in self.spec.segments_of(name) if k in self.total)


class IdentityCertifier:
    """Decides, space by space, whether weight matching's first sweep from the identity leaves that
    space as it is (`identity_optimal`). For `weight_matching(certifier=...)`: it consults this
    only while no permutation has moved, and calls `before_move` before the first move.

    `target` and `model` are the two sides of the matching (target = the mean of the others);
    `centre` is the pass's `PassCentre` (its `total` must hold the running sum the target was
    computed from). `before_move` is forwarded to the caller (e.g. to materialise a lazy target
    before the model's tensors are permuted in place).
    """

    def __init__(
        self,
        spec: PermutationSpec,
        centre: PassCentre,
        target: Mapping[str, torch.Tensor],
        model: Mapping[str, torch.Tensor],
        *,
        precision: str = "fp32",
        device: str = "cpu",
        threads: int = 1,
        before_move: Callable[[], None] | None = None,
    ):
        self.spec, self.centre, self.target, self.model = spec, centre, target, model
        self.precision, self.device, self.threads = precision, str(device), threads
        self._before_move = before_move
        self._moved = False
        self._lock = threading.Lock()
        self.prepared = False
        self.decided: dict[str, str] = {}
        """Space -> BOUND / ROWS / SEARCH, as decided."""
        self.sums: dict[str, dict[str, np.ndarray]] = {}

    def before_move(self) -> None:
        if not self._moved:
            self._moved = True
            if self._before_move is not None:
                self._before_move()

    def prepare(self, pool: Executor | None = None) -> None:
        """One pass over both models: per space and unit, `<T_u, M_u>`, `||T_u||^2`, `||M_u||^2`,
        `||T_u - R_u||^2`, `||M_u - R_u||^2` in float64 (and the centre, if not built yet)."""
        if self.prepared:
            return
        self.centre.build()
        spec, g = self.spec, self.centre.scale
        for name, space in spec.spaces.items():
            self.sums[name] = {f: np.zeros(space.size) for f in ("dot", "tt", "mm", "aa", "bb")}
        keys = [k for k in spec.axes if k in self.target and k in self.model and k in self.centre.total]

        def one(key: str) -> list[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
            t_full, m_full, s_full = self.target[key], self.model[key], self.centre.total[key]
            if t_full.dim() == 0:
                t_full, m_full, s_full = t_full[None], m_full[None], s_full[None]
            out = []
            for axis, segments in spec.axes[key].items():
                for seg in segments:
                    m = len(seg.units)
                    t, mm, s = (_unit_rows(x, axis, seg.start, m) for x in (t_full, m_full, s_full))
                    rows = max(1, CHUNK_ELEMENTS // max(1, t.shape[1]))
                    parts: dict[str, list[np.ndarray]] = {f: [] for f in ("dot", "tt", "mm", "aa", "bb")}
                    for lo in range(0, m, rows):
                        tc, mc = t[lo : lo + rows].double(), mm[lo : lo + rows].double()
                        rc = s[lo : lo + rows].double().mul_(g)
                        parts["dot"].append((tc * mc).sum(1).numpy())
                        parts["tt"].append((tc * tc).sum(1).numpy())
                        parts["mm"].append((mc * mc).sum(1).numpy())
                        parts["aa"].append((tc - rc).square_().sum(1).numpy())
                        parts["bb"].append(mc.sub_(rc).square_().sum(1).numpy())
                    out.append((seg.space, seg.units, {f: np.concatenate(p) for f, p in parts.items()}))
            return out

        if pool is None:
            with worker_pool(self.threads) as own:
                results = list(own.map(one, keys))
        else:
            results = list(pool.map(one, keys))
        for result in results:  # in key order: the sums do not depend on the thread count
            for name, units, values in result:
                for field, value in values.items():
                    np.add.at(self.sums[name][field], units, value)
        self.prepared = True

    def identity_optimal(self, space: str) -> bool:
        """True when the identity is certainly weight matching's answer for `space` (the other
        spaces at the identity); False leaves the space to weight matching's own solve."""
        if not self.prepared:
            with self._lock:
                self.prepare()
        verdict = self._decide(space)
        with self._lock:
            self.decided[space] = verdict
        return verdict != SEARCH

    def counts(self) -> dict[str, int]:
        out = {BOUND: 0, ROWS: 0, SEARCH: 0}
        for verdict in self.decided.values():
            out[verdict] += 1
        return out

    def _decide(self, space: str) -> str:
        sums = self.sums[space]
        if space not in self.centre.row_max:  # no tensor of this space in the models
            return BOUND
        n = self.spec.spaces[space].size
        if n == 1:
            return BOUND
        g = self.centre.scale
        gamma = product_error(self.spec, space, self.precision, self.device)
        gamma_g = self.centre.error[space]
        tn, mn = np.sqrt(sums["tt"]), np.sqrt(sums["mm"])
        an, bn = np.sqrt(sums["aa"]), np.sqrt(sums["bb"])
        sn = self.centre.norms[space]
        rn = g * sn
        lower = sums["dot"] - gamma * tn * mn
        upper = (
            g * g * (self.centre.row_max[space] + gamma_g * sn * _max_excluding_self(sn))
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
        rows = self._exact_rows(space, failing)  # (len(failing), n) float64, <T_u, M_v>
        rows += gamma * tn[failing, None] * mn[None, :]
        rows[np.arange(len(failing)), failing] = -np.inf
        best = rows.max(axis=1)
        margin = SLACK * (np.abs(lower[failing]) + np.abs(best) + tn[failing] * mn.max())
        return ROWS if bool((lower[failing] > best + margin).all()) else SEARCH

    def _exact_rows(self, space: str, units: np.ndarray) -> np.ndarray:
        """`<T_u, M_v>` for the given rows u and every v, in float64 (exact products, float64 sums)."""
        n = self.spec.spaces[space].size
        out = np.zeros((len(units), n))
        wanted = np.full(n, -1, dtype=np.int64)
        wanted[units] = np.arange(len(units))
        for key, axis, seg in self.spec.segments_of(space):
            if key not in self.target or key not in self.model:
                continue
            local = wanted[seg.units]
            picked = np.flatnonzero(local >= 0)
            if len(picked) == 0:
                continue
            m = len(seg.units)
            t_full, m_full = self.target[key], self.model[key]
            if t_full.dim() == 0:
                t_full, m_full = t_full[None], m_full[None]
            t = _unit_rows(t_full, axis, seg.start, m)[torch.from_numpy(picked)]
            mm = _unit_rows(m_full, axis, seg.start, m)
            width = max(1, CHUNK_ELEMENTS // max(1, m))
            block = torch.zeros(len(picked), m, dtype=torch.float64)
            for lo in range(0, t.shape[1], width):
                block.addmm_(t[:, lo : lo + width].double(), mm[:, lo : lo + width].double().T)
            np.add.at(out, (local[picked][:, None], seg.units[None, :]), block.numpy())
        return out
