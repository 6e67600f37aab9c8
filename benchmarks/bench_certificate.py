"""How often MergeMany's identity certificate decides alignments of trained models, and whether it
gives the full search's answer: the quality benchmark's models (small SD1-layout diffusion models
trained on scikit-learn's digits, cached in .bench_cache/quality/ and trained when missing).

    python benchmarks/bench_certificate.py [--width 16] [--threads 1] [--drift-levels 100:3e-4,300:1e-3,1000:3e-3,1000:1e-2]
        [--soups 2,4,8] [--independent 4]

Sets, each merged with `merge_many` twice (the default, and `full_search=True`):
- drift: the base (independent model 1) and its two fine-tunes (digits 0-4, 5-9) at each drift
  level of `bench_quality.py` (fine-tune steps:lr from the usual fine-tune to far past it);
- soups: 2, 4 and 8 fine-tunes of the base on disjoint digit classes (bench_quality's soups);
- independent: independent models 1..K (trained apart: the certificate must fall back).
Per set: spaces per alignment proved by the bound, with exact rows, searched; the permutations,
objectives and reports equal to the full search's (True/False); the two times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_quality as bq  # noqa: E402

from benchmarks.quality import data, models  # noqa: E402
from benchmarks.quality.train import TrainConfig  # noqa: E402
from sd_mecha_rebasin import merge_many, permutation_spec  # noqa: E402

FIELDS = ("model", "gain", "distance", "changed", "units_moved", "sweeps", "distance_before")


def same(a, b) -> bool:
    return (
        all(all(np.array_equal(p[n], q[n]) for n in p) for p, q in zip(a.perms, b.perms))
        and [h.objective for h in a.history] == [h.objective for h in b.history]
        and [[getattr(s, f) for f in FIELDS] for s in a.steps]
        == [[getattr(s, f) for f in FIELDS] for s in b.steps]
    )


def compare(name: str, spec, sds: list[dict[str, torch.Tensor]], threads: int) -> dict:
    t0 = time.perf_counter()
    fast = merge_many(spec, sds, threads=threads)
    t1 = time.perf_counter()
    full = merge_many(spec, sds, threads=threads, full_search=True)
    t2 = time.perf_counter()
    decided = [(s.certified, s.exact_rows, s.searched) for s in fast.steps]
    row = {
        "set": name,
        "models": len(sds),
        "alignments": len(fast.steps),
        "bound": sum(d[0] for d in decided),
        "rows": sum(d[1] for d in decided),
        "searched": sum(d[2] for d in decided),
        "moved": sum(1 for s in fast.steps if s.changed),
        "same": same(fast, full),
        "seconds": round(t1 - t0, 1),
        "full_seconds": round(t2 - t1, 1),
    }
    print(
        f"{name:<32} N={row['models']} alignments {row['alignments']:>2} (moved {row['moved']}): spaces "
        f"{row['bound']:>4} by the bound, {row['rows']:>3} with exact rows, {row['searched']:>4} searched; "
        f"same as full search: {row['same']}; {row['seconds']} s vs {row['full_seconds']} s",
        flush=True,
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=str(ROOT / ".bench_cache" / "quality"))
    p.add_argument(
        "--drift-levels",
        type=lambda s: tuple((int(a), float(b)) for a, b in (x.split(":") for x in s.split(","))),
        default=((100, 3e-4), (300, 1e-3), (1000, 3e-3), (1000, 1e-2)),
        help="fine-tune STEPS:LR pairs (bench_quality's drift levels)",
    )
    p.add_argument("--soups", type=lambda s: tuple(int(x) for x in s.split(",")), default=bq.SOUP_SIZES)
    p.add_argument("--independent", type=int, default=4, help="independent models merged together")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    q = argparse.Namespace(steps=300, batch=32, lr=1e-3, cache=args.cache)
    c = args.width
    width = models.Width(unet=c, clip=2 * c, clip_heads=4, groups=8 if c >= 32 else 4)
    spec = permutation_spec("sd1-ldm", arch=models.arch(width), shapes=models.ldm_shapes(width))
    train_data, _ = data.load_digits_split(8)
    cache = Path(args.cache)
    base = bq.independent(q, width, 1, train_data)
    rows = []
    for steps, lr in args.drift_levels:
        fts = []
        for classes, seed in zip((bq.LOW, bq.HIGH), (11, 12)):
            config = TrainConfig(steps=steps, seed=seed, batch=32, lr=lr, warmup=min(20, steps // 10))
            tag = "drift" + "".join(map(str, classes)) + f"-w{config.warmup}-from-ind1"
            fts.append(bq.fine_tuned(cache, width, tag, base, train_data.subset(classes), config))
        drift = max(bq.drift(base, ft)["unet"] for ft in fts)
        rows.append(
            compare(f"drift {steps}:{lr:g} (UNet drift {drift:.3f})", spec, [base, *fts], args.threads)
        )
    for n in args.soups:
        fts = []
        for k, chunk in enumerate(np.array_split(np.arange(10), n)):
            classes = tuple(int(x) for x in chunk)
            config = TrainConfig(steps=100, seed=100 + k, batch=32, lr=3e-4, warmup=5)
            tag = "soup" + "".join(map(str, classes)) + "-from-ind1"
            fts.append(bq.fine_tuned(cache, width, tag, base, train_data.subset(classes), config))
        rows.append(compare(f"soup of {n} fine-tunes", spec, fts, args.threads))
    ind = [bq.independent(q, width, seed, train_data) for seed in range(1, args.independent + 1)]
    rows.append(compare("independent models", spec, ind, args.threads))
    print(f"all equal to the full search: {all(r['same'] for r in rows)}")


if __name__ == "__main__":
    main()
