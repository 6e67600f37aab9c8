"""Weight matching alone on a full-size random pair: B = legal random permutation of A + 1% noise.

    python benchmarks/bench_weight_matching.py sd1-ldm [--threads 2] [--iters 100]

Prints wall time, sweeps, per-sweep figures, peak RSS, and whether the hidden permutation was
recovered. Random fp16 weights with fan-in-scaled init; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from sd_mecha_rebasin import permutation_spec, random_permutation, weight_matching
from sd_mecha_rebasin.architectures import config_shapes
from sd_mecha_rebasin.permutations.spec import invert, permute_tensor


def random_weights(
    shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            continue
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        std = 1 / np.sqrt(fan_in) if len(shape) > 1 else 0.1
        out[key] = (torch.randn(shape, generator=g) * std).to(dtype)
    return out


def fine_tuned_permuted_copy(spec, ref, perms, noise: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in ref.items():
        v = permute_tensor(spec, key, value, perms).float()
        if v.numel() > 1:
            v = v + noise * v.std() * torch.randn(v.shape, generator=g)
        out[key] = v.to(value.dtype)
    return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=["sd1-ldm", "sd2-ldm", "sdxl-sgm"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    t0 = time.perf_counter()
    shapes = config_shapes(args.config)
    spec = permutation_spec(args.config)
    ref = random_weights({k: shapes[k] for k in spec.axes}, seed=0, dtype=torch.float16)
    hidden = random_permutation(spec, seed=1)
    model = fine_tuned_permuted_copy(spec, ref, hidden, args.noise, seed=2)
    params = sum(v.numel() for v in ref.values())
    print(
        f"{args.config}: {len(spec.spaces)} permutations, {len(ref)} permuted keys, {params / 1e9:.2f} B parameters"
    )
    print(f"built the pair in {time.perf_counter() - t0:.1f} s, RSS so far {peak_rss_gb():.1f} GB")

    t1 = time.perf_counter()
    result = weight_matching(
        spec,
        ref,
        model,
        max_iter=args.iters,
        threads=args.threads,
        device=args.device,
        on_sweep=lambda s: print(
            f"  sweep {s.sweep}: objective {s.objective:.6e} changed {s.changed} solved {s.solved} "
            f"rel_distance {s.rel_distance:.4f} ({s.seconds:.1f} s)",
            flush=True,
        ),
    )
    wall = time.perf_counter() - t1
    expected = invert(hidden)
    wrong = sum(not np.array_equal(result.perms[n], expected[n]) for n in spec.spaces)
    print(
        f"weight_matching: {wall:.1f} s wall, {len(result.history) - 1} sweeps, converged={result.converged}"
    )
    print(
        f"recovered {len(spec.spaces) - wrong}/{len(spec.spaces)} permutations; final rel_distance "
        f"{result.final.rel_distance:.4f}"
    )
    print(f"peak RSS {peak_rss_gb():.1f} GB (two fp16 models held: {2 * params * 2 / 1e9:.1f} GB)")


if __name__ == "__main__":
    main()
