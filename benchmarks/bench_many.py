"""MergeMany on N full-size models, from files to a merged file, against sd-mecha's plain `n_average`.

    python benchmarks/bench_many.py sd1-ldm --n 4 8 [--max-rss-gb 12] [--kinds ours,plain] [--no-quality]
        [--inputs permuted|shared-basis|odd] [--starts incremental,all-others,auto] [--input-dtype fp16|fp32]
        [--low-memory] [--kinds ours,full,plain] [--project 70]

Inputs: one random base (fan-in-scaled, fp16 or --input-dtype fp32) over the config's keys; with
`--inputs permuted` (default) model i is a different random legal permutation of the base plus its
own 1% noise (every model permuted, the first included); with `shared-basis` it is the base plus
its own 1% noise, no permutation (what fine-tunes of one base are); with `odd`, models 1..N-1 are
the shared-basis ones and model N the permuted set's model N (one model in another basis among
fine-tunes). They are built once and cached
under .bench_cache/ (gitignored), one set per kind and dtype; N = 4 uses the first 4 of N = 8.
`demo-small` is the demo's small SD1 layout (files marked so merge-many takes its shapes): seconds
per run, for smoke tests. `--starts` runs ours once per MergeMany first pass and prints them side by
side (alignments, passes, final objective, time, peak RSS); `--low-memory` runs ours with it.
Each merge runs in its own process, which reports its wall time per phase and its peak RSS
(VmHWM); the parent kills a child whose RSS passes --max-rss-gb, so a run can never take the
machine down:
- ours: `many_job.merge_many_files` (what `sd-rebasin merge-many` runs: checks, MergeMany passes,
  output pass, metadata with every input's sha256, atomic write), reference = model 1;
- full: ours with `full_search=True` (`--full-search`: weight matching's products for every
  alignment, no identity certificate), the same answer, for the certificate's speed-up;
- plain: sd-mecha's `n_average` of the same files to a file, the floor.
`--project N` prints each kind's time for N models projected from this run: MergeMany's fixed cost
(the certificate's centre, one product per space) plus N times its measured cost per model (the
rest of its run over the models of the run), against `n_average`'s measured cost per model times N.
Quality: each output's distance to the base in model 1's basis, against the ideal merge's (the base
plus the mean of the N noises, i.e. every hidden permutation undone).
"""

from __future__ import annotations

import argparse
import dataclasses
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
MAX_N = 16
SMALL = "demo-small"
"""The demo's small SD1 layout (sd1-ldm keys, widths / 10): a smoke-test size."""

INPUTS = ("permuted", "shared-basis", "odd")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
STARTS = ("incremental", "all-others", "auto")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Which cached input set: the config, permuted or shared-basis, fp16 or fp32."""

    config: str
    kind: str = "permuted"
    dtype: str = "fp16"

    @property
    def tag(self) -> str:  # the original permuted fp16 names are kept (existing caches stay valid)
        return ("" if self.kind == "permuted" else "-shared") + ("" if self.dtype == "fp16" else "-fp32")

    def source(self, i: int, n: int) -> Inputs:
        """The input set model i of N is taken from (`odd`: the last one from the permuted set)."""
        if self.kind != "odd":
            return self
        return dataclasses.replace(self, kind="permuted" if i == n - 1 else "shared-basis")

    @property
    def real_config(self) -> str:
        return "sd1-ldm" if self.config == SMALL else self.config


def base_path(inputs: Inputs) -> pathlib.Path:
    return CACHE / f"{inputs.config}-many-base{'' if inputs.dtype == 'fp16' else '-fp32'}.safetensors"


def model_path(inputs: Inputs, i: int, n: int | None = None) -> pathlib.Path:
    if inputs.kind == "odd":
        assert n is not None, "odd inputs: the model count decides which model is the odd one"
        return model_path(inputs.source(i, n), i)
    return CACHE / f"{inputs.config}-many{inputs.tag}-{i + 1}-noise{NOISE}.safetensors"


def model_paths(inputs: Inputs, n: int) -> list[pathlib.Path]:
    return [model_path(inputs, i, n) for i in range(n)]


def spec_of(inputs: Inputs):
    from sd_mecha_rebasin import permutation_spec

    if inputs.config == SMALL:
        from sd_mecha_rebasin.architectures.small import SMALL_ARCH, small_shapes

        return permutation_spec(inputs.real_config, arch=SMALL_ARCH, shapes=small_shapes())
    return permutation_spec(inputs.config)


def hidden_perm(spec, inputs: Inputs, i: int, n: int | None = None):
    """Model i's hidden permutation (shared-basis: the identity)."""
    from sd_mecha_rebasin import random_permutation
    from sd_mecha_rebasin.permutations.spec import identity_permutation

    if inputs.kind == "odd":
        assert n is not None
        return hidden_perm(spec, inputs.source(i, n), i)
    if inputs.kind == "shared-basis":
        return identity_permutation(spec)
    return random_permutation(spec, seed=1000 + i)


def _lazy(path: pathlib.Path):
    """A file's tensors read one at a time with seeks, not mmap: RSS stays small."""
    from sd_mecha_rebasin.files.checkpoint import detect_family, open_checkpoint
    from sd_mecha_rebasin.files.lazy import FileStateDict

    ckpt = open_checkpoint(path)
    detect_family(ckpt)
    return FileStateDict(ckpt)


def build(inputs: Inputs, n: int) -> None:
    """The base and models 1..n (those not cached yet), in the inputs' dtype: every float key
    sd-mecha's config requires plus the optional ones the permutation rules bind (demo-small: its
    text encoder and UNet keys). Runs in a child process."""
    if inputs.kind == "odd":
        build(inputs.source(0, n), n - 1)
        odd = inputs.source(n - 1, n)
        if not model_path(odd, n - 1).exists():
            _build_models(odd, [n - 1])
        return
    _build_models(inputs, list(range(n)))


def _build_models(inputs: Inputs, indices: list[int]) -> None:
    import sd_mecha
    from bench_weight_matching import fine_tuned_permuted_copy, random_weights

    from sd_mecha_rebasin.architectures import config_shapes
    from sd_mecha_rebasin.architectures.small import DEMO_LAYOUT, DEMO_LAYOUT_KEY, small_shapes
    from sd_mecha_rebasin.files.output import write_safetensors
    from sd_mecha_rebasin.mecha.merge_method import bound_keys

    t0 = time.perf_counter()
    CACHE.mkdir(exist_ok=True)
    spec = spec_of(inputs)
    metadata = {DEMO_LAYOUT_KEY: DEMO_LAYOUT} if inputs.config == SMALL else None
    if not base_path(inputs).exists():
        if inputs.config == SMALL:
            shapes = small_shapes()
        else:
            keys = sd_mecha.extensions.model_configs.resolve(inputs.config).keys()
            bound = bound_keys(inputs.config)
            shapes = {
                k: shape
                for k, shape in config_shapes(inputs.config).items()
                if keys[k].dtype.is_floating_point and (not keys[k].optional or k in bound)
            }
        base = random_weights(shapes, seed=0, dtype=DTYPES[inputs.dtype])
        write_safetensors(base_path(inputs), base, metadata)  # streamed: no second copy in memory
        del base
    # The base is read key by key from its file and each model written as it is built: one model in
    # memory at a time (SDXL fp32: 13 GB, where a loaded base and a serialised copy made it 40).
    base = _lazy(base_path(inputs))
    for i in indices:
        if not model_path(inputs, i).exists():
            hidden = hidden_perm(spec, inputs, i)
            model = fine_tuned_permuted_copy(spec, base, hidden, NOISE, seed=2000 + i)
            tmp = model_path(inputs, i).with_suffix(".tmp")
            write_safetensors(tmp, model, metadata)
            os.replace(tmp, model_path(inputs, i))
            del model
            print(f"built {model_path(inputs, i).name} ({time.perf_counter() - t0:.0f} s)", flush=True)


# ---------------------------------------------------------------------------------------------
# One merge, in a child process


def _status_gb(field: str, pid: str = "self") -> float:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1]) / 1024**2


def run_ours(
    inputs: Inputs, n: int, out: pathlib.Path, iters: int, start: str, low_memory: bool, full_search: bool
) -> dict:
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
                    "centre_seconds": round(item.centre_seconds, 1),
                }
            )
            print(json.dumps({"progress": passes[-1]}), file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    res = merge_many_files(
        model_paths(inputs, n),
        out,
        start=start,
        low_memory=low_memory,
        full_search=full_search,
        options=RunOptions(iters=iters, overwrite=True, quiet=True, progress=False),
        on_progress=record,
    )
    seconds = time.perf_counter() - t0
    decided = {"certified": 0, "exact_rows": 0, "searched": 0}
    for step in res.steps:
        for field in decided:
            decided[field] += getattr(step, field)
    return {
        "kind": "full" if full_search else "ours",
        "decided": decided,
        "centre_seconds": sum(p.centre_seconds for p in res.passes),
        "start": start,
        "low_memory": low_memory,
        "seconds": seconds,
        "checks_seconds": seconds - res.align_seconds - res.output_seconds,
        "align_seconds": res.align_seconds,
        "output_seconds": res.output_seconds,
        "passes": passes,
        "alignments": len(res.steps),
        "objective": res.passes[-1].objective,
        "equals_weighted_mean": res.equals_weighted_mean,
        "converged": res.converged,
        "peak_rss_gb": _status_gb("VmHWM:"),
    }


def run_plain(inputs: Inputs, n: int, out: pathlib.Path) -> dict:
    import sd_mecha
    from tqdm import tqdm

    def quiet(*args, **kwargs):
        return tqdm(*args, **kwargs, disable=True)

    models = [sd_mecha.model(path, config=inputs.real_config) for path in model_paths(inputs, n)]
    t0 = time.perf_counter()
    sd_mecha.merge(sd_mecha.n_average(*models), output=out, tqdm=quiet)
    return {"kind": "plain", "seconds": time.perf_counter() - t0, "peak_rss_gb": _status_gb("VmHWM:")}


def _label(kind: str, start: str) -> str:
    return kind if kind == "plain" else f"{kind}/{start}"


def run_child(
    kind: str,
    inputs: Inputs,
    n: int,
    iters: int,
    max_rss_gb: float,
    start: str = STARTS[0],
    low_memory: bool = False,
) -> dict:
    """Run one merge in a child process; kill it if its RSS passes `max_rss_gb`."""
    out = CACHE / f"{inputs.config}-many-out-{kind}-{start}-{n}.safetensors"
    cmd = [sys.executable, __file__, inputs.config, "--n", str(n), "--child", kind, "--iters", str(iters)]
    cmd += ["--inputs", inputs.kind, "--input-dtype", inputs.dtype, "--starts", start, "--out", str(out)]
    cmd += ["--low-memory"] if low_memory else []
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = threading.Event()
    stderr_lines: list[str] = []
    label = _label(kind, start)

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
                print(f"  {label} N={n}: {line.strip()}", flush=True)

    threads = [threading.Thread(target=watch, daemon=True), threading.Thread(target=relay, daemon=True)]
    for t in threads:
        t.start()
    stdout = child.stdout.read()
    child.wait()
    threads[1].join()
    if killed.is_set():
        raise RuntimeError(f"{label} N={n} killed: RSS passed --max-rss-gb {max_rss_gb}")
    if child.returncode != 0:
        raise RuntimeError(
            f"{label} N={n} failed (exit {child.returncode}):\n{''.join(stderr_lines)[-3000:]}"
        )
    if kind == "build":
        return {}
    report = json.loads(stdout.strip().splitlines()[-1])
    report["out"] = str(out)
    return report


# ---------------------------------------------------------------------------------------------
# Quality


def quality(inputs: Inputs, n: int, outputs: dict[str, pathlib.Path]) -> dict[str, float]:
    """`||output - pi_1(base)||` for each output, and the ideal `||mean_i noise_i||` (float64, one
    key at a time; each model's hidden permutation undone to find its noise)."""
    from sd_mecha_rebasin.permutations.spec import invert, permute_tensor

    spec = spec_of(inputs)
    hidden = [hidden_perm(spec, inputs, i, n) for i in range(n)]
    undo = [invert(h) for h in hidden]
    totals = {name: 0.0 for name in outputs} | {"ideal": 0.0}
    handles = {name: _lazy(p) for name, p in outputs.items()}
    models = [_lazy(path) for path in model_paths(inputs, n)]
    base = _lazy(base_path(inputs))
    for key in base:
        b = base[key].float()
        noise = sum(permute_tensor(spec, key, m[key], u).float() for m, u in zip(models, undo)) / n - b
        totals["ideal"] += float(noise.square().sum(dtype=torch.float64))
        in_ref_basis = permute_tensor(spec, key, b, hidden[0])
        for name, h in handles.items():
            totals[name] += float((h[key].float() - in_ref_basis).square().sum(dtype=torch.float64))
    return {name: math.sqrt(v) for name, v in totals.items()}


def bench(
    inputs: Inputs,
    ns: list[int],
    kinds: list[str],
    starts: list[str],
    iters: int,
    max_rss_gb: float,
    with_quality: bool,
    low_memory: bool,
    project: int = 0,
) -> None:
    if not all(p.exists() for p in model_paths(inputs, max(ns))) or not base_path(inputs).exists():
        run_child("build", inputs, max(ns), iters, max_rss_gb)
    name = f"{inputs.config} {inputs.kind} {inputs.dtype}{' low-memory' if low_memory else ''}"
    runs = [(kind, start) for kind in ("ours", "full") if kind in kinds for start in starts]
    runs += [("plain", "")] if "plain" in kinds else []
    results = {}
    for n in ns:
        for kind, start in runs:
            label = _label(kind, start)
            r = results[(label, n)] = run_child(
                kind, inputs, n, iters, max_rss_gb, start or STARTS[0], low_memory
            )
            line = (
                f"{name} N={n} {label:>16}: {r['seconds']:7.1f} s wall, peak RSS {r['peak_rss_gb']:5.2f} GB"
            )
            if kind != "plain":
                passes = ", ".join(
                    f"pass {p['pass']} {p['seconds']:.0f} s ({p['models_changed']}/{p['aligned']} moved, "
                    f"{p['sweeps']} sweeps)"
                    for p in r["passes"]
                )
                line += (
                    f"\n{'':>14}checks {r['checks_seconds']:.1f} s, alignment {r['align_seconds']:.1f} s "
                    f"[{passes}], output pass {r['output_seconds']:.1f} s; converged {r['converged']}"
                    f"{'; the weighted mean of the inputs' if r['equals_weighted_mean'] else ''}"
                    f"\n{'':>14}spaces per alignment, summed: {r['decided']['certified']} proved by the bound, "
                    f"{r['decided']['exact_rows']} with exact rows, {r['decided']['searched']} searched; "
                    f"certificate centre {r['centre_seconds']:.1f} s"
                )
            print(line, flush=True)
        ours = [
            (label, results[(label, n)])
            for label, _ in ((_label(k, s), s) for k, s in runs)
            if not label.startswith("plain")
        ]
        if ours:
            print(f"{name} N={n} starts side by side:", flush=True)
            print(
                f"  {'start':<16} {'alignments':>10} {'passes':>6} {'objective':>18} {'seconds':>9} {'peak GB':>8}",
                flush=True,
            )
            for label, r in ours:
                print(
                    f"  {label:<16} {r['alignments']:>10} {len(r['passes']):>6} {r['objective']:>18.10g} "
                    f"{r['seconds']:>9.1f} {r['peak_rss_gb']:>8.2f}",
                    flush=True,
                )
            if len(ours) == 2:
                (la, a), (lb, b) = ours
                print(f"  {lb} / {la}: time x{b['seconds'] / a['seconds']:.2f}", flush=True)
        if ("plain", n) in results:
            plain = results[("plain", n)]
            for label, r in ours:
                print(
                    f"{name} N={n} {label} / plain: wall x{r['seconds'] / plain['seconds']:.2f}, "
                    f"output pass x{r['output_seconds'] / plain['seconds']:.2f}, "
                    f"peak RSS x{r['peak_rss_gb'] / plain['peak_rss_gb']:.2f}",
                    flush=True,
                )
                if project:
                    fixed = r["centre_seconds"]
                    ours_at = fixed + project * (r["seconds"] - fixed) / n
                    plain_at = project * plain["seconds"] / n
                    print(
                        f"{name} N={n} {label} projected to N={project}: {ours_at:.0f} s against n_average's "
                        f"{plain_at:.0f} s, x{ours_at / plain_at:.2f} (fixed {fixed:.1f} s + "
                        f"{(r['seconds'] - fixed) / n:.1f} s per model; n_average {plain['seconds'] / n:.1f} s "
                        "per model)",
                        flush=True,
                    )
        outs = {
            label: pathlib.Path(results[(label, n)]["out"]) for label, _ in results if (label, n) in results
        }
        if with_quality:
            q = quality(inputs, n, outs)
            print(f"{name} N={n} ideal: ||merge - base|| = {q['ideal']:.2f} (base + mean noise)", flush=True)
            for label in outs:
                print(
                    f"{name} N={n} {label:>16}: ||merge - base|| = {q[label]:.2f} "
                    f"(x{q[label] / q['ideal']:.3f} the ideal)",
                    flush=True,
                )
        for path in outs.values():
            path.unlink(missing_ok=True)
    lo, hi = min(ns), max(ns)
    for label in sorted({label for label, _ in results}):
        if lo != hi and (label, lo) in results and (label, hi) in results:
            a, b = results[(label, lo)], results[(label, hi)]
            print(
                f"{name} {label} N={hi} / N={lo}: peak RSS x{b['peak_rss_gb'] / a['peak_rss_gb']:.3f}, "
                f"time per model x{(b['seconds'] / hi) / (a['seconds'] / lo):.3f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=["sd1-ldm", "sd2-ldm", "sdxl-sgm", SMALL])
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8], help=f"model counts (at most {MAX_N})")
    parser.add_argument("--kinds", default="ours,plain", help="comma-separated subset of ours,full,plain")
    parser.add_argument(
        "--inputs",
        choices=INPUTS,
        default="permuted",
        help="permuted, shared-basis (fine-tunes of one base), or odd (one permuted model among them)",
    )
    parser.add_argument("--project", type=int, default=0, help="also project each kind's time to this N")
    parser.add_argument("--starts", default=STARTS[0], help=f"comma-separated subset of {','.join(STARTS)}")
    parser.add_argument("--input-dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--low-memory", action="store_true", help="run ours with --low-memory")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--max-rss-gb", type=float, default=20.0, help="kill a child whose RSS passes this")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--child", choices=["build", "ours", "full", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(not 2 <= n <= MAX_N for n in args.n):
        parser.error(f"--n: each count must lie in [2, {MAX_N}]")
    starts = args.starts.split(",")
    if not starts or any(s not in STARTS for s in starts):
        parser.error(f"--starts: a comma-separated subset of {','.join(STARTS)}")
    inputs = Inputs(args.config, args.inputs, args.input_dtype)
    if args.child == "build":
        build(inputs, max(args.n))
        return
    if args.child:
        (n,) = args.n
        if args.child in ("ours", "full"):
            report = run_ours(
                inputs, n, args.out, args.iters, starts[0], args.low_memory, args.child == "full"
            )
        else:
            report = run_plain(inputs, n, args.out)
        print(json.dumps(report))
        return
    kinds = args.kinds.split(",")
    bench(
        inputs,
        args.n,
        kinds,
        starts,
        args.iters,
        args.max_rss_gb,
        not args.no_quality,
        args.low_memory,
        args.project,
    )


if __name__ == "__main__":
    main()
