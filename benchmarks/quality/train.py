"""Denoising (epsilon-prediction) training with SD's DDPM schedule (Ho et al. 2020, eq. 14).

Schedule: Stable Diffusion's "scaled linear" betas, sqrt(beta) linear from sqrt(0.00085) to
sqrt(0.012) over 1000 steps. AdamW (no weight decay), linear warmup then cosine decay, gradient
norm clipped at 1. Model initialisation and data order both come from `seed`, so two runs with
the same seed and thread count give the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import Digits
from .models import SDModel

TIMESTEPS = 1000


def alphas_cumprod() -> torch.Tensor:
    """[1000] float32: prod_{s<=t} (1 - beta_s) for SD's scaled-linear betas."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, for latents [B, 4, S, S] and t [B] (int64)."""
    abar = alphas_cumprod()[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; `seed` drives the data order, timesteps and noise."""

    steps: int
    seed: int
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 20

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(model: SDModel, data: Digits, config: TrainConfig) -> list[float]:
    """Train `model` in place on `data` for `config.steps` steps; returns the per-step losses
    (mean squared error of the predicted noise)."""
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step)
        idx = torch.randint(len(data), (config.batch,), generator=gen)
        t = torch.randint(TIMESTEPS, (config.batch,), generator=gen)
        eps = torch.randn(data.latents[idx].shape, generator=gen)
        x_t = add_noise(data.latents[idx], eps, t)
        loss = F.mse_loss(model(x_t, t, data.labels[idx]), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
