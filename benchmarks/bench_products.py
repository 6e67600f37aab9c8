"""What one weight-matching sweep costs in matrix products, and how fast this CPU runs them.

    python benchmarks/bench_products.py sdxl-sgm [--top 12]

Counts, from the permutation spec alone (no weights), the FLOPs of every product a full sweep
builds (each space once, in the 16 MiB slices `matching` uses), grouped by GEMM shape; then times
the largest shapes in float32 and prints GFLOP/s and the sweep's floor at that rate.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from sd_mecha_rebasin import permutation_spec
from sd_mecha_rebasin.architectures import config_shapes
from sd_mecha_rebasin.common.devices import product_device
from sd_mecha_rebasin.mecha.merge_method import bound_keys
from sd_mecha_rebasin.search import matching


def product_shapes(config: str) -> collections.Counter:
    """FLOPs per `(units, slice width)` GEMM shape in one sweep."""
    shapes = {key: shape for key, shape in config_shapes(config).items() if key in bound_keys(config)}
    spec = permutation_spec(config, shapes=shapes)
    flops: collections.Counter = collections.Counter()
    meta = product_device("meta")  # shapes only: the slices `matching` would build, without data
    for space in spec.spaces:
        for key, axis, seg in spec.segments_of(space):
            value = torch.empty(shapes[key], device=meta.device)
            if value.dim() == 1:  # a bias or norm weight: a rank-1 update, not a GEMM worth counting
                continue
            for a, _ in matching._paired_chunks(value, value, axis, seg, torch.float32, meta):
                m, k = a.shape
                flops[(m, k)] += 2 * m * m * k
    return flops


def gemm_rate(m: int, k: int) -> float:
    """float32 GFLOP/s of `C += A @ B.T` with `A, B: (m, k)`, as `matching._cost_matrix` runs it."""
    a, b, c = torch.randn(m, k), torch.randn(m, k), torch.zeros(m, m)
    c.addmm_(a, b.T)
    repeats = max(1, int(2e10 // (2 * m * m * k)))
    start = time.perf_counter()
    for _ in range(repeats):
        c.addmm_(a, b.T)
    return 2 * m * m * k * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=["sd1-ldm", "sd2-ldm", "sdxl-sgm"])
    parser.add_argument("--top", type=int, default=12, help="time this many of the costliest shapes")
    args = parser.parse_args()
    flops = product_shapes(args.config)
    total = sum(flops.values())
    print(
        f"{args.config}: one sweep = {total / 1e12:.2f} TFLOP of products, {len(flops)} GEMM shapes "
        f"({torch.get_num_threads()} torch threads)"
    )
    timed = floor = 0.0
    for (m, k), f in flops.most_common(args.top):
        rate = gemm_rate(m, k)
        timed, floor = timed + f, floor + f / 1e9 / rate
        print(f"  {m:5d} units x {k:5d} wide: {f / total:6.1%} of the FLOPs, {rate:5.0f} GFLOP/s")
    print(
        f"floor at these rates: {floor * total / timed:.0f} s per sweep (shapes timed: {timed / total:.0%} of the FLOPs)"
    )


if __name__ == "__main__":
    main()
