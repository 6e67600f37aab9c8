"""MergeMany on N full-size models, from files to a merged file, against sd-mecha's plain `n_average`.

    python benchmarks/bench_many.py sd1-ldm --n 4 8 [--max-rss-gb 12] [--kinds ours,plain] [--no-quality]

Inputs: one random base (fan-in-scaled, fp16) over the config's keys; model i is a different random
legal permutation of the base plus its own 1% noise (every model permuted, the first included).
They are built once and cached under .bench_cache/ (gitignored); N = 4 uses the first 4 of N = 8.
Each merge runs in its own process, which reports its wall time per phase and its peak RSS
(VmHWM); the parent kills a child whose RSS passes --max-rss-gb, so a run can never take the
machine down:
- ours: `many_job.merge_many_files` (what `sd-rebasin merge-many` runs: checks, MergeMany passes,
  output pass, metadata with every input's sha256, atomic write), reference = model 1;
- plain: sd-mecha's `n_average` of the same files to a file, the floor.
Quality: each output's distance to the base in model 1's basis, against the ideal merge's (the base
plus the mean of the N noises, i.e. every hidden permutation undone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
CACHE = HERE.parent / ".bench_cache"
NOISE = 0.01
MAX_N = 8


def base_path(config: str) -> pathlib.Path:
    return CACHE / f"{config}-many-base.safetensors"


def model_path(config: str, i: int) -> pathlib.Path:
    return CACHE / f"{config}-many-{i + 1}-noise{NOISE}.safetensors"


def hidden_perm(spec, i: int):
    from sd_mecha_rebasin import random_permutation

    return random_permutation(spec, seed=1000 + i)


def build(config: str, n: int) -> None:
    """The base and models 1..n (those not cached yet), fp16: every float key sd-mecha's config
    requires plus the optional ones the permutation rules bind. Runs in a child process."""
    import sd_mecha
    from bench_weight_matching import fine_tuned_permuted_copy, random_weights
    from safetensors.torch import load_file, save_file

    from sd_mecha_rebasin import permutation_spec
    from sd_mecha_rebasin.architectures import config_shapes
    from sd_mecha_rebasin.mecha.merge_method import bound_keys

    t0 = time.perf_counter()
    CACHE.mkdir(exist_ok=True)
    spec = permutation_spec(config)
    if base_path(config).exists():
        base = load_file(base_path(config))
    else:
        metadata = sd_mecha.extensions.model_configs.resolve(config).keys()
        bound = bound_keys(config)
        shapes = {
            k: shape
            for k, shape in config_shapes(config).items()
            if metadata[k].dtype.is_floating_point and (not metadata[k].optional or k in bound)
        }
        base = random_weights(shapes, seed=0, dtype=torch.float16)
        save_file(base, str(base_path(config)))
    for i in range(n):
        if not model_path(config, i).exists():
            model = fine_tuned_permuted_copy(spec, base, hidden_perm(spec, i), NOISE, seed=2000 + i)
            tmp = model_path(config, i).with_suffix(".tmp")
            save_file(model, str(tmp))
            os.replace(tmp, model_path(config, i))
            del model
            print(f"built {model_path(config, i).name} ({time.perf_counter() - t0:.0f} s)", flush=True)


# ---------------------------------------------------------------------------------------------
# One merge, in a child process


def _status_gb(field: str, pid: str = "self") -> float:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1]) / 1024**2


def run_ours(config: str, n: int, out: pathlib.Path, iters: int) -> dict:
    from sd_mecha_rebasin.cli.jobs import RunOptions
    from sd_mecha_rebasin.cli.many_job import merge_many_files
    from sd_mecha_rebasin.search.many import PassStats

    passes: list[dict] = []

    def record(item) -> None:
        if isinstance(item, PassStats):
            passes.append(
                {
                    "pass": item.pass_index,
                    "seconds": round(item.seconds, 1),
                    "aligned": item.aligned,
                    "models_changed": item.models_changed,
                    "sweeps": item.sweeps,
                    "objective": item.objective,
                    "peak_rss_gb": _status_gb("VmHWM:"),
                }
            )
            print(json.dumps({"progress": passes[-1]}), file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    res = merge_many_files(
        [model_path(config, i) for i in range(n)],
        out,
        options=RunOptions(iters=iters, overwrite=True, quiet=True, progress=False),
        on_progress=record,
    )
    seconds = time.perf_counter() - t0
    return {
        "kind": "ours",
        "seconds": seconds,
        "checks_seconds": seconds - res.align_seconds - res.output_seconds,
        "align_seconds": res.align_seconds,
        "output_seconds": res.output_seconds,
        "passes": passes,
        "converged": res.converged,
        "peak_rss_gb": _status_gb("VmHWM:"),
    }


def run_plain(config: str, n: int, out: pathlib.Path) -> dict:
    import sd_mecha
    from tqdm import tqdm

    def quiet(*args, **kwargs):
        return tqdm(*args, **kwargs, disable=True)

    models = [sd_mecha.model(model_path(config, i), config=config) for i in range(n)]
    t0 = time.perf_counter()
    sd_mecha.merge(sd_mecha.n_average(*models), output=out, tqdm=quiet)
    return {"kind": "plain", "seconds": time.perf_counter() - t0, "peak_rss_gb": _status_gb("VmHWM:")}


def run_child(kind: str, config: str, n: int, iters: int, max_rss_gb: float) -> dict:
    """Run one merge in a child process; kill it if its RSS passes `max_rss_gb`."""
    out = CACHE / f"{config}-many-out-{kind}-{n}.safetensors"
    cmd = [sys.executable, __file__, config, "--n", str(n), "--child", kind, "--iters", str(iters)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = threading.Event()
    stderr_lines: list[str] = []

    def watch() -> None:
        while child.poll() is None:
            try:
                if _status_gb("VmRSS:", str(child.pid)) > max_rss_gb:
                    killed.set()
                    child.send_signal(signal.SIGKILL)
                    return
            except (OSError, StopIteration):
                return
            time.sleep(0.2)

    def relay() -> None:
        for line in child.stderr:
            stderr_lines.append(line)
            if line.startswith("{"):
                print(f"  {kind} N={n}: {line.strip()}", flush=True)

    threads = [threading.Thread(target=watch, daemon=True), threading.Thread(target=relay, daemon=True)]
    for t in threads:
        t.start()
    stdout = child.stdout.read()
    child.wait()
    threads[1].join()
    if killed.is_set():
        raise RuntimeError(f"{kind} N={n} killed: RSS passed --max-rss-gb {max_rss_gb}")
    if child.returncode != 0:
        raise RuntimeError(f"{kind} N={n} failed (exit {child.returncode}):\n{''.join(stderr_lines)[-3000:]}")
    if kind == "build":
        return {}
    report = json.loads(stdout.strip().splitlines()[-1])
    report["out"] = str(out)
    return report


# ---------------------------------------------------------------------------------------------
# Quality


def quality(config: str, n: int, outputs: dict[str, pathlib.Path]) -> dict[str, float]:
    """`||output - pi_1(base)||` for each output, and the ideal `||mean_i noise_i||` (float64, one
    key at a time; each model's hidden permutation undone to find its noise)."""
    from sd_mecha_rebasin import permutation_spec
    from sd_mecha_rebasin.files.checkpoint import open_checkpoint
    from sd_mecha_rebasin.files.lazy import FileStateDict
    from sd_mecha_rebasin.permutations.spec import invert, permute_tensor

    def lazy(path: pathlib.Path) -> FileStateDict:  # read with seeks, not mmap: RSS stays small
        return FileStateDict(open_checkpoint(path))

    spec = permutation_spec(config)
    hidden = [hidden_perm(spec, i) for i in range(n)]
    undo = [invert(h) for h in hidden]
    totals = {name: 0.0 for name in outputs} | {"ideal": 0.0}
    handles = {name: lazy(p) for name, p in outputs.items()}
    models = [lazy(model_path(config, i)) for i in range(n)]
    base = lazy(base_path(config))
    for key in base:
        b = base[key].float()
        noise = sum(permute_tensor(spec, key, m[key], u).float() for m, u in zip(models, undo)) / n - b
        totals["ideal"] += float(noise.square().sum(dtype=torch.float64))
        in_ref_basis = permute_tensor(spec, key, b, hidden[0])
        for name, h in handles.items():
            totals[name] += float((h[key].float() - in_ref_basis).square().sum(dtype=torch.float64))
    return {name: math.sqrt(v) for name, v in totals.items()}


def bench(
    config: str, ns: list[int], kinds: list[str], iters: int, max_rss_gb: float, with_quality: bool
) -> None:
    if not all(model_path(config, i).exists() for i in range(max(ns))) or not base_path(config).exists():
        run_child("build", config, max(ns), iters, max_rss_gb)
    results = {}
    for n in ns:
        for kind in kinds:
            r = results[(kind, n)] = run_child(kind, config, n, iters, max_rss_gb)
            line = (
                f"{config} N={n} {kind:>5}: {r['seconds']:7.1f} s wall, peak RSS {r['peak_rss_gb']:5.2f} GB"
            )
            if kind == "ours":
                passes = ", ".join(
                    f"pass {p['pass']} {p['seconds']:.0f} s ({p['models_changed']}/{p['aligned']} moved, "
                    f"{p['sweeps']} sweeps)"
                    for p in r["passes"]
                )
                line += (
                    f"\n{'':>14}checks {r['checks_seconds']:.1f} s, alignment {r['align_seconds']:.1f} s "
                    f"[{passes}], output pass {r['output_seconds']:.1f} s; converged {r['converged']}"
                )
            print(line, flush=True)
        if ("ours", n) in results and ("plain", n) in results:
            ours, plain = results[("ours", n)], results[("plain", n)]
            print(
                f"{config} N={n} ours / plain: wall x{ours['seconds'] / plain['seconds']:.2f}, "
                f"output pass x{ours['output_seconds'] / plain['seconds']:.2f}, "
                f"peak RSS x{ours['peak_rss_gb'] / plain['peak_rss_gb']:.2f}",
                flush=True,
            )
        if with_quality:
            outs = {kind: pathlib.Path(results[(kind, n)]["out"]) for kind in kinds if (kind, n) in results}
            q = quality(config, n, outs)
            print(
                f"{config} N={n} ideal: ||merge - base|| = {q['ideal']:.2f} (base + mean noise)", flush=True
            )
            for kind in outs:
                print(
                    f"{config} N={n} {kind:>5}: ||merge - base|| = {q[kind]:.2f} (x{q[kind] / q['ideal']:.3f} the ideal)",
                    flush=True,
                )
        for kind in kinds:
            if (kind, n) in results:
                pathlib.Path(results[(kind, n)]["out"]).unlink(missing_ok=True)
    if ("ours", 4) in results and ("ours", 8) in results:
        a, b = results[("ours", 4)]["peak_rss_gb"], results[("ours", 8)]["peak_rss_gb"]
        print(f"{config} ours peak RSS N=8 / N=4: x{b / a:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=["sd1-ldm", "sd2-ldm", "sdxl-sgm"])
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8], help=f"model counts (at most {MAX_N})")
    parser.add_argument("--kinds", default="ours,plain", help="comma-separated subset of ours,plain")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--max-rss-gb", type=float, default=20.0, help="kill a child whose RSS passes this")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--child", choices=["build", "ours", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(not 2 <= n <= MAX_N for n in args.n):
        parser.error(f"--n: each count must lie in [2, {MAX_N}]")
    if args.child == "build":
        build(args.config, max(args.n))
        return
    if args.child:
        (n,) = args.n
        out = CACHE / f"{args.config}-many-out-{args.child}-{n}.safetensors"
        if args.child == "ours":
            report = run_ours(args.config, n, out, args.iters)
        else:
            report = run_plain(args.config, n, out)
        print(json.dumps(report))
        return
    bench(args.config, args.n, args.kinds.split(","), args.iters, args.max_rss_gb, not args.no_quality)


if __name__ == "__main__":
    main()
