"""Loss along interpolation lines and the loss barrier (Git Re-Basin, Ainsworth et al. 2023, Def. 2.2).

Loss: mean squared error of the predicted noise on held-out digits, at timesteps and noise drawn
once from a fixed seed (the same for every model). Interpolation: (1 - lambda) A + lambda B for
every key, exact at lambda = 0 and 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import Digits
from .models import Width, from_ldm
from .train import TIMESTEPS, add_noise

LAMBDAS = tuple(float(x) for x in np.linspace(0.0, 1.0, 25))  # the paper's 25 points
TIME_BUCKETS = ((0, 250), (250, 500), (500, 750), (750, TIMESTEPS))
"""Timestep ranges [lo, hi) the loss is also reported per (a merge may fail at high noise only)."""


@dataclass(frozen=True)
class EvalSet:
    """Fixed noisy inputs: x_t [N, 4, S, S], t [N], eps [N, 4, S, S], labels [N]."""

    x_t: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    labels: torch.Tensor


def eval_set(held: Digits, *, draws: int = 1, seed: int = 1234) -> EvalSet:
    """`draws` (timestep, noise) pairs per held-out image, from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    x0 = held.latents.repeat(draws, 1, 1, 1)
    labels = held.labels.repeat(draws)
    t = torch.randint(TIMESTEPS, (len(labels),), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    return EvalSet(add_noise(x0, eps, t), t, eps, labels)


def loss(width: Width, state_dict: Mapping[str, torch.Tensor], data: EvalSet, batch: int = 512) -> float:
    """Mean squared error of the predicted noise over `data` (float64 sum of float32 errors)."""
    return loss_parts(width, state_dict, data, batch)[0]


def loss_parts(
    width: Width, state_dict: Mapping[str, torch.Tensor], data: EvalSet, batch: int = 512
) -> tuple[float, list[float]]:
    """(`loss`, the same mean per `TIME_BUCKETS` range) from one set of forward passes; the first is
    bit for bit `loss`'s (same summation order). A bucket without samples is NaN."""
    model = from_ldm(width, dict(state_dict))
    total = 0.0
    sums = torch.zeros(len(TIME_BUCKETS), dtype=torch.float64)
    counts = torch.zeros(len(TIME_BUCKETS), dtype=torch.float64)
    per_sample = data.eps[0].numel()
    with torch.no_grad():
        for i in range(0, len(data.t), batch):
            s = slice(i, i + batch)
            pred = model(data.x_t[s], data.t[s], data.labels[s])
            err = (pred - data.eps[s]).square().double()
            total += err.sum().item()
            sample = err.sum(dim=tuple(range(1, err.ndim)))
            for j, (lo, hi) in enumerate(TIME_BUCKETS):
                mask = (data.t[s] >= lo) & (data.t[s] < hi)
                sums[j] += sample[mask].sum()
                counts[j] += int(mask.sum()) * per_sample
    return total / data.eps.numel(), [float(x) for x in sums / counts]


def interpolate(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], lam: float
) -> dict[str, torch.Tensor]:
    """(1 - lam) * a + lam * b for every key (a's keys; b must have them). Exact at 0 and 1."""
    return {k: (1.0 - lam) * v + lam * b[k] for k, v in a.items()}


def curve(
    width: Width,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    data: EvalSet,
    lambdas: Sequence[float] = LAMBDAS,
) -> list[float]:
    """Loss at each lambda of (1 - lambda) a + lambda b."""
    return curve_parts(width, a, b, data, lambdas)[0]


def curve_parts(
    width: Width,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    data: EvalSet,
    lambdas: Sequence[float] = LAMBDAS,
) -> tuple[list[float], list[list[float]]]:
    """(`curve`, one curve per `TIME_BUCKETS` range) from the same forward passes."""
    parts = [loss_parts(width, interpolate(a, b, lam), data) for lam in lambdas]
    return [p[0] for p in parts], [[p[1][j] for p in parts] for j in range(len(TIME_BUCKETS))]


def barrier(losses: Sequence[float]) -> float:
    """max over lambda of loss(lambda) minus the mean of the two endpoint losses (Def. 2.2).

    `losses` run from lambda = 0 to lambda = 1. Raises ValueError if fewer than 2 points."""
    if len(losses) < 2:
        raise ValueError("a loss curve needs at least its two endpoints")
    return max(losses) - 0.5 * (losses[0] + losses[-1])


def average(models: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Plain mean of N state dicts (sd-mecha's n_average with equal weights)."""
    return {k: sum(m[k] for m in models) / len(models) for k in models[0]}


def units_moved(perms: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(units whose index a permutation changes, all permuted units), summed over spaces."""
    moved = sum(int((np.asarray(p) != np.arange(len(p))).sum()) for p in perms.values())
    return moved, sum(len(p) for p in perms.values())


def relative_change(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], keys: Sequence[str]
) -> float:
    """||after - before|| / ||before|| over the given keys (Frobenius norm of all of them together)."""
    num = sum(float((after[k].double() - before[k].double()).square().sum()) for k in keys)
    den = sum(float(before[k].double().square().sum()) for k in keys)
    return (num / den) ** 0.5
