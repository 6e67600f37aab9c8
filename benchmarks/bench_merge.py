"""Whole merges to a file on a full-size random pair: `weighted_sum(A, rebasin(B, A))` against sd-mecha.

    python benchmarks/bench_merge.py sd1-ldm [sdxl-sgm ...] [--iters 100] [--no-quality] [--device cuda]

A is random (fan-in-scaled, fp16) over the config's keys; B is a legal random permutation of A
plus 1% noise. Both are built once and cached under .bench_cache/ (gitignored). Each merge runs
in its own process, which reports its wall time and peak RSS:
- ours: `weighted_sum(A, git_rebasin(B, A), 0.5)`, and ours-bf16 with `precision="bf16"` (the
  pre-pass products on `--device`, CPU by default; sd-mecha itself merges on CPU);
- plain: sd-mecha's `weighted_sum(A, B, 0.5)`, the floor;
- builtin (sdxl-sgm only): `weighted_sum(A, rebasin(B, A), 0.5)` with sd-mecha's own SDXL `rebasin`.
Then (unless --no-quality) each output's distance to A is compared with the ideal merge's,
A + noise / 2 (B with the hidden permutation undone, averaged with A).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import resource
import subprocess
import sys
import threading
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
CACHE = HERE.parent / ".bench_cache"
NOISE = 0.01


def pair_paths(config: str) -> tuple[pathlib.Path, pathlib.Path]:
    return CACHE / f"{config}-A.safetensors", CACHE / f"{config}-B-noise{NOISE}.safetensors"


def build_pair(config: str) -> None:
    """A and B as fp16 safetensors: every float key sd-mecha's config requires, plus the optional
    ones the permutation rules bind (e.g. SDXL's CLIP-L layer 11). Runs in a child process, so
    that the benchmark's own process stays small while the merges run."""
    a_path, b_path = pair_paths(config)
    import sd_mecha
    from bench_weight_matching import fine_tuned_permuted_copy, random_weights
    from safetensors.torch import save_file

    from sd_mecha_rebasin import permutation_spec, random_permutation
    from sd_mecha_rebasin.architectures import config_shapes
    from sd_mecha_rebasin.mecha.merge_method import bound_keys

    t0 = time.perf_counter()
    metadata = sd_mecha.extensions.model_configs.resolve(config).keys()
    bound = bound_keys(config)
    shapes = {
        k: shape
        for k, shape in config_shapes(config).items()
        if metadata[k].dtype.is_floating_point and (not metadata[k].optional or k in bound)
    }
    spec = permutation_spec(config)
    a = random_weights(shapes, seed=0, dtype=torch.float16)
    CACHE.mkdir(exist_ok=True)
    save_file(a, str(a_path))
    b = fine_tuned_permuted_copy(spec, a, random_permutation(spec, seed=1), NOISE, seed=2)
    del a
    save_file(b, str(b_path))
    print(
        f"built {a_path.name}, {b_path.name} ({len(shapes)} keys) in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# One merge, in a child process


def run_one(kind: str, config: str, out: pathlib.Path, iters: int, device: str = "cpu") -> dict:
    """One merge; the phases are split at the pre-pass events: reading both models for the pre-pass,
    the pre-pass itself (warm start and sweeps), then sd-mecha streaming every key to the file."""
    import sd_mecha

    import sd_mecha_rebasin
    from sd_mecha_rebasin.common import events

    a_path, b_path = pair_paths(config)
    a, b = sd_mecha.model(a_path, config=config), sd_mecha.model(b_path, config=config)
    if kind.startswith("ours"):
        precision = "bf16" if kind == "ours-bf16" else "fp32"
        aligned = sd_mecha_rebasin.rebasin(b, a, iters=iters, precision=precision, device=device)
    elif kind == "builtin":
        aligned = sd_mecha.rebasin(b, a)  # sd-mecha's interface: rebasin(a, ref, iters=10)
    else:
        aligned = b
    sweeps: list = []
    marks: dict[str, float] = {}

    def record(event: str, data: dict) -> None:
        marks[event] = time.perf_counter()
        if event == "sweep":
            sweeps.append(data["stats"])
        if event == "prepass_end":
            marks["start_seconds"] = data["result"].history[0].seconds

    phase_peaks = {"read": 0.0, "pre-pass": 0.0, "streaming": 0.0}
    stop = threading.Event()

    def sample_rss() -> None:  # which phase holds the peak (sampled every 50 ms)
        while not stop.wait(0.05):
            phase = (
                "streaming" if "prepass_end" in marks else "pre-pass" if "prepass_start" in marks else "read"
            )
            phase_peaks[phase] = max(phase_peaks[phase], _rss_gb())

    sampler = threading.Thread(target=sample_rss, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    with events.listening(record):
        sd_mecha.merge(sd_mecha.weighted_sum(a, aligned, alpha=0.5), output=out, tqdm=_quiet)
    end = time.perf_counter()
    stop.set()
    sampler.join()
    report = {"kind": kind, "seconds": end - t0, "peak_rss_gb": _peak_rss_gb(), "sweeps": len(sweeps)}
    report["phase_peaks_gb"] = phase_peaks
    if "prepass_end" in marks:
        report["read_seconds"] = marks["prepass_start"] - t0
        report["prepass_seconds"] = marks["prepass_end"] - marks["prepass_start"]
        report["start_seconds"] = marks["start_seconds"]
        report["stream_seconds"] = end - marks["prepass_end"]
        report["rel_distance"] = sweeps[-1].rel_distance if sweeps else float("nan")
    return report


def _quiet(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, **kwargs, disable=True)


def _rss_gb() -> float:
    status = pathlib.Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024**2


def _peak_rss_gb() -> float:
    """This process's own peak RSS. Linux's ru_maxrss would also count the parent's RSS at fork."""
    try:
        status = pathlib.Path("/proc/self/status").read_text()
        return (
            int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024**2
        )
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux, bytes on macOS


def run_child(kind: str, config: str, iters: int, device: str = "cpu") -> dict:
    out = CACHE / f"{config}-out-{kind}.safetensors"
    cmd = [sys.executable, __file__, config, "--child", kind, "--iters", str(iters), "--device", device]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # -9: most likely the out-of-memory killer
        raise RuntimeError(f"{kind} failed with exit code {done.returncode}:\n{done.stderr[-3000:]}")
    if kind == "build":
        print(done.stdout.strip(), flush=True)
        return {}
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["out"] = str(out)
    return report


# ---------------------------------------------------------------------------------------------
# Quality and the table


def distance_to(reference: pathlib.Path, other: pathlib.Path, undo: tuple | None = None) -> float:
    """`||other - reference||` over the keys both files have (float64, one tensor at a time);
    `undo=(spec, perms)` permutes `other` first."""
    from safetensors import safe_open

    from sd_mecha_rebasin.permutations.spec import permute_tensor

    total = 0.0
    with safe_open(str(reference), "pt") as ref, safe_open(str(other), "pt") as oth:
        for key in set(ref.keys()) & set(oth.keys()):
            value = oth.get_tensor(key)
            if undo is not None:
                value = permute_tensor(undo[0], key, value, undo[1])
            diff = value.double() - ref.get_tensor(key).double()
            total += float((diff * diff).sum())
    return math.sqrt(total)


def ideal_distance(config: str) -> float:
    """`||A + noise / 2 - A||`: the distance to A of the merge with the hidden permutation undone."""
    from sd_mecha_rebasin import permutation_spec, random_permutation
    from sd_mecha_rebasin.permutations.spec import invert

    spec = permutation_spec(config)
    return 0.5 * distance_to(*pair_paths(config), undo=(spec, invert(random_permutation(spec, seed=1))))


def bench(config: str, iters: int, quality: bool, only: list[str] | None = None, device: str = "cpu") -> None:
    a_path, b_path = pair_paths(config)
    if not (a_path.exists() and b_path.exists()):
        run_child("build", config, iters)
    kinds = ["ours", "ours-bf16", "plain"] + (["builtin"] if config == "sdxl-sgm" else [])
    kinds = [kind for kind in kinds if not only or kind in only]
    reports = {}
    for kind in kinds:
        reports[kind] = r = run_child(kind, config, iters, device)
        extra = ""
        if "prepass_seconds" in r:
            extra = (
                f"\n{'':>17} read {r['read_seconds']:.1f} s, pre-pass {r['prepass_seconds']:.1f} s (warm start "
                f"{r['start_seconds']:.1f} s + {r['sweeps']} sweeps), streaming + write {r['stream_seconds']:.1f} s; "
                f"distance to A x{r['rel_distance']:.4f} of before; sampled peak RSS by phase: "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["phase_peaks_gb"].items())
            )
        print(
            f"{config} {kind:>8}: {r['seconds']:7.1f} s wall, peak RSS {r['peak_rss_gb']:5.2f} GB{extra}",
            flush=True,
        )
    for name in ("ours", "ours-bf16"):
        if name not in reports:
            continue
        ours = reports[name]
        for base in ("plain", "builtin"):
            if base in reports:
                other = reports[base]
                print(
                    f"{config} {name} / {base}: wall x{ours['seconds'] / other['seconds']:.2f}, "
                    f"peak RSS x{ours['peak_rss_gb'] / other['peak_rss_gb']:.2f}"
                )
    if quality:
        ideal = ideal_distance(config)
        print(f"{config}    ideal: ||merge - A|| = {ideal:.2f} (A + noise / 2)")
        for kind, r in reports.items():
            d = distance_to(a_path, pathlib.Path(r["out"]))
            print(f"{config} {kind:>8}: ||merge - A|| = {d:.2f} (x{d / ideal:.3f} the ideal)", flush=True)
    for r in reports.values():
        pathlib.Path(r["out"]).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", choices=["sd1-ldm", "sd2-ldm", "sdxl-sgm"])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--kinds", help="comma-separated subset of ours,ours-bf16,plain,builtin")
    parser.add_argument("--no-quality", action="store_true", help="skip the distance of each output to A")
    parser.add_argument("--device", default="cpu", help="torch device of our pre-pass products (cpu, cuda)")
    parser.add_argument(
        "--child", choices=["build", "ours", "ours-bf16", "plain", "builtin"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child == "build":
        build_pair(*args.configs)
        return
    if args.child:
        (config,) = args.configs
        out = CACHE / f"{config}-out-{args.child}.safetensors"
        print(json.dumps(run_one(args.child, config, out, args.iters, args.device)))
        return
    for config in args.configs:
        only = args.kinds.split(",") if args.kinds else None
        bench(config, args.iters, not args.no_quality, only, args.device)


if __name__ == "__main__":
    main()
