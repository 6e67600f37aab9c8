"""The `sd-rebasin` command line: merge, align, inspect, demo.

Every problem the user can fix is a `UserError`, printed as one line
`sd-rebasin: error: <file>: <problem>` with exit code 1 (2 for usage errors), never a traceback
(set SD_REBASIN_DEBUG=1 to see one). Output files are written under a temporary name and renamed
when complete, so a failure or Ctrl-C leaves nothing half-written.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click
import torch

from .checkpoint import (
    FAMILY_NAMES,
    MARKER_KEYS,
    Checkpoint,
    UserError,
    check_finite,
    check_pair,
    component_of_keys_cached,
    detect_family,
    ema_map,
    is_merged_key,
    open_checkpoint,
    register_pickle_format,
    release_pickles,
    validate,
)
from .matching import PRECISIONS
from .output import AtomicOutput, anonymize_recipe, build_metadata, legacy_hash, sha256_file

PROG = "sd-rebasin"
DEMO_LAYOUT_KEY = "sd_rebasin_layout"
DEMO_LAYOUT = "demo-small-sd1"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_LABELS = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}


# --------------------------------------------------------------------------------------------
# Options and results


@dataclasses.dataclass
class RunOptions:
    """Everything `run` needs besides the two models; the CLI options map one to one."""

    iters: int = 100
    seed: int = 0
    threads: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    output_dtype: str = "fp16"
    save_recipe: pathlib.Path | None = None
    metadata: bool = True
    overwrite: bool = False
    quiet: bool = False
    progress: bool = True
    arch: Mapping[str, Mapping[str, Any]] | None = None
    """Architecture overrides for models whose facts differ from the family's (the demo's small models)."""
    shapes: Mapping[str, tuple[int, ...]] | None = None
    """Key -> shape the models are checked against instead of the family config's (small models)."""


@dataclasses.dataclass
class RunResult:
    """What a merge or an alignment did (the --json summary is built from it)."""

    command: str
    output: pathlib.Path
    config: str
    alpha: float | None
    sweeps: int
    converged: bool
    objective_start: float
    objective: float
    rel_distance: float
    permutations: int
    permutations_changed: int
    prepass_seconds: float
    seconds: float
    output_bytes: int
    kept: dict[str, int]
    left_out: int
    perms: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out = {
            "command": self.command,
            "output": str(self.output),
            "family": FAMILY_NAMES.get(self.config, self.config),
            "config": self.config,
            "alpha": self.alpha,
            "sweeps": self.sweeps,
            "converged": self.converged,
            "objective_start": self.objective_start,
            "objective": self.objective,
            "rel_distance": self.rel_distance,
            "permutations": self.permutations,
            "permutations_changed": self.permutations_changed,
            "prepass_seconds": round(self.prepass_seconds, 3),
            "seconds": round(self.seconds, 3),
            "output_bytes": self.output_bytes,
            "kept_keys": self.kept,
            "left_out_keys": self.left_out,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        if self.alpha is None:
            del out["alpha"]
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# --------------------------------------------------------------------------------------------
# Progress


class Progress:
    """The pre-pass bar (one step per sweep) and sd-mecha's key bar, shown one after the other.

    sd-mecha runs the pre-pass inside its first key, while its own key bar is already open; the
    key bar is therefore held back (its count kept) until the pre-pass has ended.
    """

    def __init__(self, enabled: bool, expect_prepass: bool):
        self.enabled = enabled
        self.lock = threading.RLock()
        self.prepass_running = expect_prepass
        self.prepass_bar = None
        self.key_bar = None
        self.key_total: int | None = None
        self.key_done = 0
        self.result = None
        self.prepass_seconds = 0.0
        self._last_objective: float | None = None

    # events from sd_mecha_rebasin.events
    def __call__(self, event: str, data: Mapping[str, Any]) -> None:
        with self.lock:
            if event == "prepass_start":
                self.prepass_running = True
                if self.enabled:
                    from tqdm import tqdm

                    self.prepass_bar = tqdm(
                        total=int(data.get("max_iter") or 0) or None,
                        desc=f"{data.get('spaces', '?')} permutations",
                        unit="sweep",
                        dynamic_ncols=True,
                        bar_format="re-basin sweep {n_fmt}/{total_fmt} |{bar:12}| {desc} [{elapsed}<{remaining}]",
                    )
            elif event == "sweep":
                stats = data["stats"]
                if self.prepass_bar is not None:
                    delta = (
                        ""
                        if self._last_objective is None
                        else f" ({stats.objective - self._last_objective:+.4g})"
                    )
                    self.prepass_bar.set_description_str(
                        f"objective {stats.objective:.6g}{delta}, {stats.changed} changed, "
                        f"distance {stats.rel_distance:.4f}",
                        refresh=False,
                    )
                    self.prepass_bar.update(1)
                self._last_objective = stats.objective
            elif event == "prepass_end":
                self.result = data.get("result")
                self.prepass_seconds = float(data.get("seconds") or 0.0)
                self.prepass_running = False
                if self.prepass_bar is not None:
                    self.prepass_bar.close()
                    self.prepass_bar = None
                self._show_keys()

    def _show_keys(self) -> None:
        if self.enabled and self.key_bar is None and self.key_total is not None and not self.prepass_running:
            from tqdm import tqdm

            self.key_bar = tqdm(
                total=self.key_total, desc="keys", unit="key", dynamic_ncols=True, initial=self.key_done
            )

    def tqdm_factory(self) -> type:
        """A stand-in for tqdm that sd-mecha's `merge(tqdm=...)` uses for its key bar."""
        progress = self

        class KeyBar:
            def __init__(self, *args: Any, total: int | None = None, **kwargs: Any):
                with progress.lock:
                    progress.key_total = total
                    progress.key_done = 0
                    progress._show_keys()

            def __enter__(self) -> KeyBar:
                return self

            def __exit__(self, *exc: Any) -> None:
                self.close()

            def set_postfix(self, *args: Any, **kwargs: Any) -> None:
                pass

            def update(self, n: int = 1) -> None:
                with progress.lock:
                    progress.key_done += n
                    if progress.key_bar is not None:
                        progress.key_bar.update(n)

            def close(self) -> None:
                with progress.lock:
                    if progress.key_bar is not None:
                        progress.key_bar.close()
                        progress.key_bar = None

        return KeyBar

    def close(self) -> None:
        with self.lock:
            for bar in (self.prepass_bar, self.key_bar):
                if bar is not None:
                    bar.close()
            self.prepass_bar = self.key_bar = None


class _LogToStderr(logging.Handler):
    """sd-mecha's warnings as one-line `sd-rebasin: warning:` messages (above any progress bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage().strip().splitlines()
            line = text[0] if text else ""
        except Exception:  # noqa: BLE001 - a broken log record must not stop a merge
            return
        warn(line)


def warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"{PROG}: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _capture_logging(quiet: bool) -> Iterator[None]:
    root = logging.getLogger()
    handler: logging.Handler = logging.NullHandler() if quiet else _LogToStderr(logging.WARNING)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


# --------------------------------------------------------------------------------------------
# The pipeline shared by merge and align


def check_device(device: str) -> str:
    """Normalise `--device`; UserError when CUDA is asked for but torch sees no GPU."""
    device = device.strip().lower()
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA support"
                if torch.version.cuda is None
                else "torch sees no CUDA GPU"
            )
            raise UserError(f"--device {device}: no GPU available ({why}); use --device cpu")
        if ":" in device:
            index = int(device.split(":", 1)[1]) if device.split(":", 1)[1].isdigit() else -1
            if not 0 <= index < torch.cuda.device_count():
                raise UserError(f"--device {device}: no such GPU ({torch.cuda.device_count()} visible)")
        return device
    raise UserError(f"--device {device!r}: expected cpu or cuda", exit_code=2)


def load_inputs(
    a_path: pathlib.Path, b_path: pathlib.Path, opts: RunOptions
) -> tuple[Checkpoint, Checkpoint, RunOptions]:
    """Open, identify and validate both models from their headers (the NaN/Inf scan comes later).

    When a file written by `sd-rebasin demo` (marked in its metadata) takes part, both are checked
    against the demo's small layout instead of the family's: a full-size model then fails validation.
    """
    register_pickle_format()
    a = open_checkpoint(a_path)
    detect_family(a)
    b = open_checkpoint(b_path)
    detect_family(b)
    check_pair(a, b)
    if opts.shapes is None and any(c.metadata.get(DEMO_LAYOUT_KEY) == DEMO_LAYOUT for c in (a, b)):
        from .demo import SMALL_ARCH, small_shapes

        opts = dataclasses.replace(opts, arch=SMALL_ARCH, shapes=small_shapes())
    validate(a, opts.shapes)
    validate(b, opts.shapes)
    return a, b, opts


def _hash_inputs(paths: Sequence[pathlib.Path], stop: threading.Event) -> dict[str, tuple[str, str]]:
    return {p.name: (sha256_file(p, stop=stop), legacy_hash(p)) for p in dict.fromkeys(paths)}


def _in_background(fn: Callable[[], Any]) -> Any:
    """Run `fn` in a daemon thread; the main thread stays free to receive Ctrl-C.

    sd-mecha's worker pool finishes every queued key before it lets an interrupt through; here the
    interrupt reaches `run` at once, which removes its temporary files (see `main` for the exit).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            box["error"] = e

    thread = threading.Thread(target=target, name="sd-rebasin-merge", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.25)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _rebasin_node(model: Any, ref: Any, opts: RunOptions) -> Any:
    """`git_rebasin(model, ref)`: `model` permuted into `ref`'s basis (a recipe node)."""
    from .merge_method import rebasin

    return rebasin(
        model,
        ref,
        iters=opts.iters,
        seed=opts.seed,
        threads=opts.threads,
        device=opts.device,
        precision=opts.precision,
    )


def _arch(config: str, arch: Mapping[str, Mapping[str, Any]] | None) -> contextlib.AbstractContextManager:
    """The merge method's architecture override for small models (nothing for real checkpoints)."""
    if not arch:
        return contextlib.nullcontext()
    from .merge_method import arch_override

    return arch_override(config, arch)


def _perm_spec(config: str, opts: RunOptions):
    from . import permutation_spec

    return permutation_spec(config, arch=opts.arch, shapes=opts.shapes)


def _kept_category(config: str, key: str) -> str:
    if key in MARKER_KEYS:
        return "markers"
    component = component_of_keys_cached(config).get(key)
    if component == "ema":
        return "ema"
    if component == "scheduler":
        return "scheduler"
    if component is None:
        return "unknown"
    return "buffers"


def assemble(
    mode: str,
    a: Checkpoint,
    b: Checkpoint,
    merged: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    perms: Mapping[str, Any] | None,
    opts: RunOptions,
) -> tuple[dict[str, torch.Tensor], dict[str, int], int]:
    """The output state dict: sd-mecha's result for merged keys, the rest kept as the policy says.

    The output has the key layout of the base model (A for a merge, B for an alignment). Keys that
    take part in the merge come from sd-mecha. Everything else of the base model is kept as it is:
    EMA weights (cast to the output dtype; for an alignment permuted like the UNet weights they copy),
    scheduler buffers, v-prediction markers, integer buffers and keys the config does not know
    (stored dtype kept); so is a weight the other model lacks (cast to the output dtype). Keys only
    in the other model are left out (returned as a count).
    """
    base, other = (b, a) if mode == "align" else (a, b)
    config = base.config
    assert config is not None
    out: dict[str, torch.Tensor] = {}
    kept: collections.Counter[str] = collections.Counter()
    to_keep: list[str] = []
    for key in base.shapes:
        canon = base.canonical.get(key, key)
        if is_merged_key(config, canon, base.dtypes[key]) and canon in merged:
            out[canon] = merged[canon]
        else:
            out[canon] = None  # type: ignore[assignment]  # placeholder keeps the file's order
            to_keep.append(key)
    unet = [k for k in out if k.startswith("model.diffusion_model.")]
    emas = ema_map(to_keep, unet)  # EMA copies of UNet weights: weights, cast to the output dtype
    spec = _perm_spec(config, opts) if mode == "align" and perms and emas else None
    for key, tensor in base.iter_tensors(to_keep):
        canon = base.canonical.get(key, key)
        weight = key in emas or is_merged_key(config, canon, tensor.dtype)
        if spec is not None and key in emas:
            from .spec import permute_tensor

            tensor = permute_tensor(spec, emas[key], tensor, dict(perms))
            kept["ema_permuted"] += 1
        else:
            kept["weights" if weight and key not in emas else _kept_category(config, canon)] += 1
        if weight and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        out[canon] = tensor
    base_keys = set(out)
    left_out = sum(1 for k in other.shapes if other.canonical.get(k, k) not in base_keys)
    return out, dict(kept), left_out


def run(
    mode: str,
    a_path: str | os.PathLike,
    b_path: str | os.PathLike,
    output: str | os.PathLike,
    opts: RunOptions,
    alpha: float = 0.5,
) -> RunResult:
    """Merge (`mode="merge"`: (1 - alpha) * A + alpha * pi(B)) or align (`mode="align"`: pi(B)) to a file.

    `mode="average"` is the plain weighted sum (1 - alpha) * A + alpha * B, no re-basin (the demo's
    baseline), through the same checks and output.
    """
    if mode not in ("merge", "align", "average"):
        raise ValueError(f"unknown mode {mode!r}")
    import sd_mecha

    from . import events

    t0 = time.perf_counter()
    a_path, b_path, output = pathlib.Path(a_path), pathlib.Path(b_path), pathlib.Path(output)
    device = check_device(opts.device)
    opts = dataclasses.replace(opts, device=device)
    dtype = DTYPES[opts.output_dtype]
    a, b, opts = load_inputs(a_path, b_path, opts)
    for ckpt in (a, b):
        if output.resolve() == ckpt.path.resolve():
            raise UserError(f"is an input ({'A' if ckpt is a else 'B'}); choose another output file", output)
    demo_layout = any(c.metadata.get(DEMO_LAYOUT_KEY) == DEMO_LAYOUT for c in (a, b))
    stop_hashing = threading.Event()
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd-rebasin-hash")
    try:
        hashes = hasher.submit(_hash_inputs, [a.path, b.path], stop_hashing) if opts.metadata else None
        with contextlib.ExitStack() as stack:
            target = stack.enter_context(AtomicOutput(output, overwrite=opts.overwrite))
            recipe_target = None
            if opts.save_recipe is not None:
                recipe_target = stack.enter_context(
                    AtomicOutput(opts.save_recipe, opts.overwrite, suffix=".mecha")
                )
            for ckpt in (a, b):
                check_finite(ckpt, threads=opts.threads or 0)
            _warn_prediction_mismatch(mode, a, b, opts.quiet)

            config = a.config
            assert config is not None
            model_a = sd_mecha.model(str(a.path.resolve()), config)
            model_b = sd_mecha.model(str(b.path.resolve()), config)
            if mode == "average":
                recipe = sd_mecha.weighted_sum(model_a, model_b, alpha=alpha)
            elif mode == "merge":
                recipe = sd_mecha.weighted_sum(model_a, _rebasin_node(model_b, model_a, opts), alpha=alpha)
            else:
                recipe = _rebasin_node(model_b, model_a, opts)

            progress = Progress(enabled=opts.progress and not opts.quiet, expect_prepass=mode != "average")
            merged: dict[str, Any] = {}
            try:
                with events.listening(progress), _capture_logging(opts.quiet), _arch(config, opts.arch):
                    _in_background(
                        lambda: sd_mecha.merge(
                            recipe,
                            output=merged,
                            output_dtype=dtype,
                            merge_device="cpu",
                            threads=opts.threads or None,
                            tqdm=progress.tqdm_factory(),
                            check_extra_keys=False,
                            omit_non_finite_inputs=False,
                        )
                    )
            finally:
                progress.close()
            mecha = merged.pop("__metadata__", {}).get("mecha_recipe")
            result = progress.result
            perms = dict(result.perms) if result is not None else {}
            tensors, kept, left_out = assemble(mode, a, b, merged, dtype, perms, opts)
            merged.clear()
            if left_out and not opts.quiet:
                other, base = (a, b) if mode == "align" else (b, a)
                warn(
                    f"{left_out} key(s) only in {other.name} left out (the output has the keys of {base.name})"
                )

            metadata = None
            if opts.metadata:
                metadata = build_metadata(
                    mode=mode,
                    config=config,
                    a=a,
                    b=b,
                    hashes=hashes.result() if hashes is not None else {},
                    output=output,
                    mecha_recipe=anonymize_recipe(mecha, {str(c.path.resolve()): c.name for c in (a, b)})
                    if mecha
                    else None,
                    params={
                        "multiplier": None if mode == "align" else alpha,
                        "alpha": None if mode == "align" else alpha,
                        "iters": opts.iters,
                        "seed": opts.seed,
                        "sweeps": _sweeps(result),
                        "converged": bool(result.converged) if result is not None else None,
                        "rel_distance": result.rel_distance if result is not None else None,
                        "save_as_half": opts.output_dtype != "fp32",
                        "output_dtype": opts.output_dtype,
                        "config_source": config,
                    },
                    prediction_type="v"
                    if "v_pred" in (b if mode == "align" else a).canonical.values()
                    else None,
                )
                if demo_layout:
                    metadata[DEMO_LAYOUT_KEY] = DEMO_LAYOUT
            if recipe_target is not None and not mecha:
                raise UserError("sd-mecha could not serialize this recipe", opts.save_recipe)
            size = target.commit(tensors, metadata)
            del tensors
            if recipe_target is not None:
                recipe_target.commit_text(
                    mecha
                )  # no final newline: sd-mecha 1.1.8 cannot parse an empty line
    finally:
        stop_hashing.set()
        hasher.shutdown(wait=False, cancel_futures=True)
        release_pickles()
    first = result.history[0] if result is not None else None
    return RunResult(
        command=mode,
        output=output,
        config=config,
        alpha=None if mode == "align" else alpha,
        sweeps=_sweeps(result),
        converged=bool(result.converged) if result is not None else False,
        objective_start=float(first.objective) if first is not None else math.nan,
        objective=float(result.objective) if result is not None else math.nan,
        rel_distance=float(result.rel_distance) if result is not None else math.nan,
        permutations=len(perms),
        permutations_changed=sum(1 for p in perms.values() if any(int(v) != i for i, v in enumerate(p))),
        prepass_seconds=progress.prepass_seconds,
        seconds=time.perf_counter() - t0,
        output_bytes=size,
        kept=kept,
        left_out=left_out,
        perms=perms,
    )


def _sweeps(result: Any) -> int:
    return max(0, len(result.history) - 1) if result is not None else 0


def _warn_prediction_mismatch(mode: str, a: Checkpoint, b: Checkpoint, quiet: bool) -> None:
    """Warn when one model carries a v-prediction / zero-terminal-SNR marker and the other does not."""
    if quiet:
        return
    base = b if mode == "align" else a
    for marker in ("v_pred", "ztsnr"):
        in_a, in_b = marker in a.canonical.values(), marker in b.canonical.values()
        if in_a != in_b:
            has, lacks = (a, b) if in_a else (b, a)
            warn(
                f"{has.name} has the '{marker}' marker and {lacks.name} does not "
                f"(different prediction types?); the output keeps the markers of {base.name}"
            )


# --------------------------------------------------------------------------------------------
# Click commands


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _print_result(res: RunResult, as_json: bool, quiet: bool) -> None:
    if as_json:
        click.echo(json.dumps(res.summary()))
        return
    if quiet:
        return
    family = FAMILY_NAMES.get(res.config, res.config)
    click.echo(f"wrote {res.output} ({family}, {_fmt_bytes(res.output_bytes)})")
    state = "converged" if res.converged else "stopped at --iters"
    click.echo(
        f"re-basin: {res.sweeps} sweep(s), {state}; objective {res.objective_start:.6g} -> {res.objective:.6g}; "
        f"||A - pi(B)|| / ||A - B|| = {res.rel_distance:.4f}; "
        f"{res.permutations_changed} of {res.permutations} permutations moved; {res.prepass_seconds:.1f} s"
    )
    if res.kept:
        other = "A" if res.command == "align" else "B"
        labels = {
            "ema": "EMA weights",
            "scheduler": "scheduler buffers",
            "markers": "v-prediction markers",
            "buffers": "integer buffers",
            "unknown": "keys sd-mecha does not know",
            "weights": f"weights {other} lacks",
            "ema_permuted": "EMA weights (permuted like the UNet)",
        }
        parts = ", ".join(f"{n} {labels.get(k, k)}" for k, n in sorted(res.kept.items()))
        click.echo(f"kept from {'A' if other == 'B' else 'B'}: {parts}")
    click.echo(f"done in {res.seconds:.1f} s")


def _common_options(fn: Callable) -> Callable:
    options = [
        click.option(
            "--iters",
            type=click.IntRange(min=0),
            default=100,
            show_default=True,
            help="Most weight-matching sweeps (stops earlier when no permutation changes).",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sweep order."),
        click.option(
            "--threads",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Worker threads; 0 uses every CPU for matching and sd-mecha's default for keys.",
        ),
        click.option(
            "--device",
            default="cpu",
            show_default=True,
            metavar="cpu|cuda",
            help="Device for the weight-matching products.",
        ),
        click.option(
            "--precision",
            type=click.Choice(list(PRECISIONS)),
            default="fp32",
            show_default=True,
            help="Weight-matching products: fp32 is exact; bf16 products are about 1.5x faster on CPUs with bf16 "
            "units, and may pick a different unit where two are near-equal.",
        ),
        click.option(
            "--output-dtype",
            type=click.Choice(list(DTYPES)),
            default="fp16",
            show_default=True,
            help="Dtype of the merged weights (buffers and markers keep theirs).",
        ),
        click.option(
            "--save-recipe",
            type=click.Path(path_type=pathlib.Path),
            default=None,
            metavar="FILE.mecha",
            help="Also write the sd-mecha recipe (needs `import sd_mecha_rebasin` to load).",
        ),
        click.option("--no-metadata", is_flag=True, help="Write no metadata into the output file."),
        click.option("--overwrite", is_flag=True, help="Replace the output file if it exists."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars, warnings or summary."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object on stdout."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _options(kw: dict[str, Any]) -> RunOptions:
    return RunOptions(
        iters=kw["iters"],
        seed=kw["seed"],
        threads=kw["threads"],
        device=kw["device"],
        precision=kw["precision"],
        output_dtype=kw["output_dtype"],
        save_recipe=kw["save_recipe"],
        metadata=not kw["no_metadata"],
        overwrite=kw["overwrite"],
        quiet=kw["quiet"],
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sd-mecha-rebasin", prog_name=PROG)
def cli() -> None:
    """Exact Git Re-Basin merging of Stable Diffusion checkpoints (SD1, SD2, SDXL).

    Start with `sd-rebasin demo`: two small models, merged without and with re-basin.
    """


@cli.command()
@click.argument("model_a", metavar="A", type=click.Path(path_type=pathlib.Path))
@click.argument("model_b", metavar="B", type=click.Path(path_type=pathlib.Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=pathlib.Path),
    default=pathlib.Path("merged.safetensors"),
    show_default=True,
    help="Output .safetensors file (never overwritten without --overwrite).",
)
@click.option(
    "--alpha",
    type=float,
    default=0.5,
    show_default=True,
    help="Weight of B: the output is (1 - alpha) * A + alpha * pi(B); 0.5 is the plain average "
    "of A and B aligned to A, 0 gives A, 1 gives pi(B).",
)
@click.option("--allow-extrapolation", is_flag=True, help="Allow --alpha outside [0, 1].")
@_common_options
def merge(
    model_a: pathlib.Path,
    model_b: pathlib.Path,
    output: pathlib.Path,
    alpha: float,
    allow_extrapolation: bool,
    as_json: bool,
    **kw: Any,
) -> int:
    """Align B to A, then merge: (1 - alpha) * A + alpha * pi(B).

    A and B are .safetensors or .ckpt/.pt files of the same family (SD1, SD2 or SDXL). The output
    has A's keys: EMA weights, scheduler buffers, v-prediction markers and keys sd-mecha does not
    know are copied from A as they are.
    """
    if not math.isfinite(alpha) or (not allow_extrapolation and not 0.0 <= alpha <= 1.0):
        raise UserError(
            f"--alpha {alpha}: must lie in [0, 1] (pass --allow-extrapolation to go beyond)", exit_code=2
        )
    res = run("merge", model_a, model_b, output, _options(kw), alpha=alpha)
    _print_result(res, as_json, kw["quiet"])
    return 0


@cli.command()
@click.argument("model_b", metavar="B", type=click.Path(path_type=pathlib.Path))
@click.option(
    "--ref",
    "model_a",
    metavar="A",
    required=True,
    type=click.Path(path_type=pathlib.Path),
    help="The model whose basis B is permuted into.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=pathlib.Path),
    help="Output .safetensors file (never overwritten without --overwrite).",
)
@_common_options
def align(
    model_b: pathlib.Path, model_a: pathlib.Path, output: pathlib.Path, as_json: bool, **kw: Any
) -> int:
    """Write B permuted into A's basis (the same function as B; nothing merged).

    The output has B's keys; B's EMA weights are permuted like the UNet weights they copy.
    """
    res = run("align", model_a, model_b, output, _options(kw))
    _print_result(res, as_json, kw["quiet"])
    return 0


def describe_checkpoint(
    path: pathlib.Path, verbose: bool = False, opts: RunOptions | None = None
) -> dict[str, Any]:
    """What `inspect` reports about one file."""
    opts = opts or RunOptions()
    register_pickle_format()
    try:
        ckpt = open_checkpoint(path)
        config = detect_family(ckpt)
        if opts.shapes is None and ckpt.metadata.get(DEMO_LAYOUT_KEY) == DEMO_LAYOUT:
            from .demo import SMALL_ARCH, small_shapes

            opts = dataclasses.replace(opts, arch=SMALL_ARCH, shapes=small_shapes())
        problem = None
        try:
            validate(ckpt, opts.shapes)
        except UserError as e:
            problem = e.problem
        dtypes = collections.Counter(_DTYPE_LABELS.get(d, str(d)) for d in ckpt.dtypes.values())
        parts: collections.Counter[str] = collections.Counter()
        components = component_of_keys_cached(config)
        for key in ckpt.shapes:
            canon = ckpt.canonical.get(key, key)
            parts[components.get(canon, "unknown")] += 1
        info: dict[str, Any] = {
            "file": str(path),
            "format": ckpt.kind,
            "bytes": path.stat().st_size,
            "family": ckpt.family,
            "config": config,
            "keys": len(ckpt.shapes),
            "parameters": ckpt.parameters(),
            "dtypes": dict(dtypes.most_common()),
            "parts": dict(parts.most_common()),
            "markers": sorted(k for k in ckpt.canonical.values() if k in MARKER_KEYS),
            "modelspec": {
                k: v
                for k, v in ckpt.metadata.items()
                if k.startswith("modelspec.") and k != "modelspec.thumbnail"
            },
            "merge_recipe": "sd_merge_recipe" in ckpt.metadata or "mecha_recipe" in ckpt.metadata,
            "problem": problem,
        }
        if problem is None:
            spec = _perm_spec(config, opts)
            info["spec"] = spec.describe(verbose=verbose)
            info["spec_summary"] = spec.summary()
            info["permuted_keys"] = sum(1 for k in ckpt.canonical.values() if k in spec.axes)
        return info
    finally:
        release_pickles()


@cli.command("inspect")
@click.argument("file", type=click.Path(path_type=pathlib.Path))
@click.option("-v", "--verbose", is_flag=True, help="List every permutation and every permuted key.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def inspect_cmd(file: pathlib.Path, verbose: bool, as_json: bool) -> int:
    """Show a checkpoint's family, keys, dtypes and what re-basin permutes in it."""
    info = describe_checkpoint(file, verbose)
    if as_json:
        info.pop("spec", None)
        click.echo(json.dumps(info))
        return 0 if info["problem"] is None else 1
    click.echo(f"file:        {info['file']} ({info['format']}, {_fmt_bytes(info['bytes'])})")
    click.echo(f"family:      {info['family']} (sd-mecha config {info['config']})")
    click.echo(f"keys:        {info['keys']} ({info['parameters']:,} parameters)")
    click.echo("dtypes:      " + ", ".join(f"{k} ({n})" for k, n in info["dtypes"].items()))
    click.echo("parts:       " + ", ".join(f"{k} ({n})" for k, n in info["parts"].items()))
    if info["markers"]:
        click.echo("markers:     " + ", ".join(info["markers"]))
    for key, value in info["modelspec"].items():
        click.echo(f"{key}: {value}")
    if info["problem"] is not None:
        click.echo(f"cannot be re-based: {info['problem']}")
        return 1
    click.echo(
        f"re-basin permutes {info['permuted_keys']} of its {info['keys']} keys; the {info['family']} spec:"
    )
    click.echo("  " + info["spec"].replace("\n", "\n  "))
    return 0


@cli.command()
@click.option(
    "--out-dir",
    type=click.Path(path_type=pathlib.Path),
    default=None,
    help="Keep the demo's models and merges in this directory (default: a temporary one).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the models and the hidden permutation."
)
@click.option(
    "--noise",
    type=float,
    default=0.02,
    show_default=True,
    help="Fine-tune-like noise added to B, relative to each tensor's standard deviation.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Worker threads (0: all CPUs).",
)
@click.option("--overwrite", is_flag=True, help="Replace files already in --out-dir.")
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Print nothing (the exit status says whether the permutation was recovered).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object on stdout.")
def demo(
    out_dir: pathlib.Path | None,
    seed: int,
    noise: float,
    threads: int,
    overwrite: bool,
    quiet: bool,
    as_json: bool,
) -> int:
    """Merge two small SD1-layout models with a plain average and with re-basin (no downloads, seconds).

    B is a random legal permutation of A plus fine-tune-like noise: the same network in another
    basis. A plain average of A and B is far from both; re-basin finds the permutation and its
    merge stays next to A.
    """
    from .demo import run_demo

    report = run_demo(
        out_dir=out_dir, seed=seed, noise=noise, threads=threads, overwrite=overwrite, quiet=quiet or as_json
    )
    if as_json:
        click.echo(json.dumps(report))
    return 0 if report["recovered"] else 1


# --------------------------------------------------------------------------------------------
# Entry point


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 error, 2 usage, 130 interrupted).

    `argv=None` is the real command line (sys.argv); a list runs in-process (tests, embedding).
    SIGTERM is handled like Ctrl-C while it runs, so that temporary files are removed.
    """
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread (embedded use)
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    debug = os.environ.get("SD_REBASIN_DEBUG", "") not in ("", "0")
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name=PROG, standalone_mode=False)
        return int(code or 0)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx is not None else str(e))
        return 0
    except click.UsageError as e:
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _error(e.format_message().replace("\n", " ") + where)
        return 2
    except UserError as e:
        if debug:
            raise
        _error(str(e))
        return e.exit_code
    except click.ClickException as e:
        _error(e.format_message())
        return e.exit_code
    except (click.Abort, KeyboardInterrupt):
        _error("interrupted; no output written")
        if argv is None:
            _exit_now(130)
        return 130
    except MemoryError:
        _error("out of memory (try fewer --threads, or a machine with more RAM)")
        return 1
    except BrokenPipeError:
        return 1
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback; SD_REBASIN_DEBUG=1 shows it
        if debug:
            raise
        _error(
            f"internal error: {type(e).__name__}: {_first_line(str(e))} (set SD_REBASIN_DEBUG=1 for the traceback)"
        )
        return 1


def _exit_now(code: int) -> None:
    """Leave without waiting for worker threads (sd-mecha's pool would finish every queued key first).

    Only for the real command line (`main()` without argv): the temporary files are already gone.
    """
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _error(message: str) -> None:
    click.echo(f"{PROG}: error: {message}", err=True)


if __name__ == "__main__":
    sys.exit(main())
