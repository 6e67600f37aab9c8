"""Exact linear assignment (maximisation), with lapx as the fast path and scipy as the reference.

lapx's Jonker-Volgenant (`lapjvh`) is exact, releases the GIL and is 2.5-8x faster than scipy at
the widths SD models have (1280-5120). scipy's `linear_sum_assignment` is the fallback when lapx is
missing and the reference the tests compare against.
"""

from __future__ import annotations

import numpy as np

try:  # pragma: no cover - import guard
    import lap as _lapx
except ImportError:  # pragma: no cover
    _lapx = None

from scipy.optimize import linear_sum_assignment as _scipy_lsa

SOLVERS = ("lapx", "scipy")


def default_solver() -> str:
    return "lapx" if _lapx is not None else "scipy"


def solve_assignment(score: np.ndarray, solver: str | None = None) -> np.ndarray:
    """Return `cols` maximising `sum(score[i, cols[i]])` over permutations (square matrix).

    lapx minimises: a contiguous float64 `score` is negated in place for the solve and restored
    after it (negation is exact), instead of copying a matrix that reaches 200 MB at SDXL widths.
    """
    solver = solver or default_solver()
    score = np.ascontiguousarray(score, dtype=np.float64)
    if score.shape[0] == 1:
        return np.zeros(1, dtype=np.int64)
    if solver == "lapx":
        np.negative(score, out=score)
        try:
            _, rows, cols = _lapx.lapjvh(score)
        finally:
            np.negative(score, out=score)
        return _as_column_map(rows, cols, len(score))
    if solver == "scipy":
        _, cols = _scipy_lsa(score, maximize=True)
        return np.asarray(cols, dtype=np.int64)
    raise ValueError(f"unknown assignment solver {solver!r}; choose one of {SOLVERS}")


def _as_column_map(rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """lapx returns aligned (rows, cols) pairs; turn them into `cols[i]` for row i."""
    out = np.empty(n, dtype=np.int64)
    out[np.asarray(rows, dtype=np.int64)] = np.asarray(cols, dtype=np.int64)
    return out


def solve_assignment_batch(scores: np.ndarray, solver: str | None = None) -> np.ndarray:
    """Solve a (B, n, n) stack of independent assignment problems; returns (B, n) column indices."""
    solver = solver or default_solver()
    scores = np.ascontiguousarray(scores, dtype=np.float64)
    count, n, _ = scores.shape
    if n == 1:
        return np.zeros((count, 1), dtype=np.int64)
    if solver == "lapx" and count > 1:
        _, rows, cols = _lapx.lapjvh_batch(-scores, n_threads=1)
        out = np.empty((count, n), dtype=np.int64)
        out[np.arange(count)[:, None], np.asarray(rows, dtype=np.int64)] = np.asarray(cols, dtype=np.int64)
        return out
    return np.stack([solve_assignment(s, solver) for s in scores])
