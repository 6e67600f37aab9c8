"""The `sd-rebasin` command line: merge, align, inspect, demo (commands and printing only).

The jobs themselves are library functions in `jobs.py`; progress display is `progress.py`. This
module imports neither torch nor sd-mecha: each command imports its job when it runs (after
`common.launch.finish_import`), so `--help` and usage errors answer at once.
Every problem the user can fix is a `UserError`, printed as one line
`sd-rebasin: error: <file>: <problem>` with exit code 1 (2 for usage errors), never a traceback
(set SD_REBASIN_DEBUG=1 to see one). Output files are written under a temporary name and renamed
when complete, so a failure or Ctrl-C leaves nothing half-written. With `--json`, stdout holds one
JSON object whatever happens: the command's summary, or `{"command", "error", "exit_code"}` when
it fails; both list the command's warnings (`"warnings"`), which also go to stderr unless `-q`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from ..common.errors import UserError
from ..common.launch import INTERRUPTED, end_start_guard, finish_import, import_deferred, json_requested
from .progress import PROG, recording_warnings

if TYPE_CHECKING:
    from .jobs import RunOptions, RunResult

PRECISIONS = ("fp32", "bf16")
"""`--precision`: `search.matching.PRECISIONS`, written out so that `--help` needs no torch (a test
checks that the two agree)."""
OUTPUT_DTYPES = ("fp16", "bf16", "fp32")
"""`--output-dtype`: the keys of `jobs.DTYPES`, written out for the same reason (tested likewise)."""
BLOCK_ORDERS = {
    "SD1 and SD2": (26, "BASE, IN00..IN11, M00, OUT00..OUT11"),
    "SDXL": (20, "BASE, IN00..IN08, M00, OUT00..OUT08"),
}
"""`--alpha`'s block counts and orders, as `mecha.blocks.block_names` and `block_order_text` give
them from sd-mecha's block configs for sd1-ldm and sdxl-sgm (tested likewise)."""


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _print_result(res: RunResult, as_json: bool, quiet: bool) -> None:
    if as_json:
        _print_json(res.summary())
        return
    if quiet:
        return
    from ..files.checkpoint import FAMILY_NAMES

    family = FAMILY_NAMES.get(res.config, res.config)
    click.echo(f"wrote {res.output} ({family}, {_fmt_bytes(res.output_bytes)})")
    click.echo(rebasin_line(res))
    if res.kept:
        other = "A" if res.command == "align" else "B"
        labels = {
            "ema": "EMA weights",
            "scheduler": "scheduler buffers",
            "markers": "prediction markers",
            "dropped": "extra keys dropped (not part of the canonical layout)",
            "lcm": "LCM guidance projection",
            "buffers": "integer buffers",
            "unknown": "keys sd-mecha does not know",
            "weights": f"weights {other} lacks",
            "ema_permuted": "EMA weights (permuted like the UNet)",
        }
        parts = ", ".join(f"{n} {labels.get(k, k)}" for k, n in sorted(res.kept.items()))
        click.echo(f"kept from {'A' if other == 'B' else 'B'}: {parts}")
    click.echo(f"done in {res.seconds:.1f} s")


def rebasin_line(res: RunResult) -> str:
    """What re-basin did, in one line: sweeps, permutations and units moved, `||A - pi(B)|| / ||A - B||`;
    when nothing moved, that the merge is the plain weighted sum (the alignment: B as it is)."""
    same = (
        "this merge equals the plain weighted sum (1 - alpha) * A + alpha * B"
        if res.command == "merge"
        else "the output is B as it is"
    )
    moved = (
        f"{res.permutations_changed} of {res.permutations} permutations, "
        f"{res.units_moved} of {res.units} units"
    )
    if res.sweeps == 0:  # --iters 0
        return f"re-basin: --iters 0 aligns nothing: {same}"
    sweeps = f"{res.sweeps} sweep(s), {'converged' if res.converged else 'stopped at --iters'}"
    if res.permutations_changed == 0:
        why = (
            "re-basin was not needed for this pair" if res.command == "merge" else "B is already in A's basis"
        )
        return f"re-basin: nothing moved ({moved}; {sweeps}): {same}; {why}"
    return (
        f"re-basin: {moved} moved; ||A - pi(B)|| / ||A - B|| = {res.rel_distance:.4f}; {sweeps}; "
        f"objective {res.objective_start:.6g} -> {res.objective:.6g}; {res.prepass_seconds:.1f} s"
    )


# --------------------------------------------------------------------------------------------
# --json: one object on stdout, warnings included, failures too


@dataclasses.dataclass
class _Report:
    """The command now running, for its `--json` object: its name, whether --json was given, and
    the warnings so far (also the failure object's, when it fails)."""

    command: str | None
    as_json: bool
    warnings: list[str] = dataclasses.field(default_factory=list)


_report: _Report | None = None


def _reporting(command: str) -> Callable[[Callable], Callable]:
    """Run a command with its warnings recorded (stderr unless `quiet`), for `_print_json` and for
    the failure object `_main` prints under `--json`; the package's deferred import (torch,
    sd-mecha) is finished first."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run_command(*args: Any, **kw: Any) -> Any:
            global _report
            finish_import()
            report = _Report(command, bool(kw.get("as_json")))
            _report = report
            with recording_warnings(echo=not kw.get("quiet", False)) as report.warnings:
                return fn(*args, **kw)

        return run_command

    return decorate


def _print_json(obj: dict[str, Any]) -> None:
    """`obj` and the command's warnings as one JSON object on stdout."""
    warnings = list(_report.warnings) if _report is not None else []
    click.echo(json.dumps({**obj, "warnings": warnings}))


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
            type=click.Choice(list(OUTPUT_DTYPES)),
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
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print one JSON object on stdout: the summary (what re-basin did, units and permutations "
            "moved, the output), or the error and exit code when the command fails; both list the "
            "warnings (on stderr as well, unless -q).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _options(kw: dict[str, Any], as_json: bool = False) -> RunOptions:
    """The job's options; under `--json` the job always reports its warnings (the JSON object lists
    them; `-q` then keeps them off stderr only)."""
    from .jobs import RunOptions

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
        quiet=kw["quiet"] and not as_json,
        progress=_is_terminal(sys.stderr) and not kw["quiet"],  # bars for a person; none in logs and pipes
    )


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


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
    default="0.5",
    show_default=True,
    metavar="ALPHA",
    help="Weight of B: the output is (1 - alpha) * A + alpha * pi(B); 0.5 is the plain average "
    "of A and B aligned to A, 0 gives A, 1 gives pi(B). Per-block weights (MBW, supermerger's "
    "blocks): one number per block, comma-separated, in this order: "
    + "; ".join(f"{family} ({count}): {order}" for family, (count, order) in BLOCK_ORDERS.items())
    + ". Or BLOCK=W pairs, "
    "the rest from default=W or --alpha-default (e.g. IN00=0,OUT11=1,default=0.5). BASE is the "
    "text encoder(s), time embedding and (SD1/SD2) VAE; SDXL's VAE follows BASE unless VAE=W is given.",
)
@click.option(
    "--alpha-default",
    type=float,
    default=None,
    help="With BLOCK=W pairs in --alpha: the weight of the blocks they leave out.",
)
@click.option("--allow-extrapolation", is_flag=True, help="Allow --alpha outside [0, 1].")
@_common_options
@_reporting("merge")
def merge(
    model_a: pathlib.Path,
    model_b: pathlib.Path,
    output: pathlib.Path,
    alpha: str,
    alpha_default: float | None,
    allow_extrapolation: bool,
    as_json: bool,
    **kw: Any,
) -> int:
    """Align B to A, then merge: (1 - alpha) * A + alpha * pi(B).

    A and B are .safetensors or .ckpt/.pt files of the same family (SD1, SD2 or SDXL); fp8 scaled
    files are dequantized exactly first (bitsandbytes NF4/FP4 and NVFP4 are refused). The output
    has A's keys: EMA weights, scheduler buffers, v-prediction markers and keys sd-mecha does not
    know are copied from A as they are.

    The summary says what re-basin did: permutations and units (channels, heads) moved, and
    ||A - pi(B)|| / ||A - B||. When nothing moved, the merge equals the plain weighted sum of A and
    B (fine-tunes of one base usually share its basis) and the summary says so.
    """
    from ..mecha.blocks import check_range, parse_alpha
    from .jobs import run

    try:
        weights = parse_alpha(alpha, alpha_default)
        check_range(weights, allow_extrapolation)
    except ValueError as e:
        raise UserError(str(e), exit_code=2) from e
    per_key = weights if weights.per_block else weights.scalar
    res = run("merge", model_a, model_b, output, _options(kw, as_json), alpha=per_key)
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
@_reporting("align")
def align(
    model_b: pathlib.Path, model_a: pathlib.Path, output: pathlib.Path, as_json: bool, **kw: Any
) -> int:
    """Write B permuted into A's basis (the same function as B; nothing merged).

    The output has B's keys; B's EMA weights are permuted like the UNet weights they copy.
    """
    from .jobs import run

    res = run("align", model_a, model_b, output, _options(kw, as_json))
    _print_result(res, as_json, kw["quiet"])
    return 0


@cli.command("merge-many")
@click.argument("models", metavar="M1 M2 ... MN", nargs=-1, type=click.Path(path_type=pathlib.Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=pathlib.Path),
    help="Output .safetensors file (never overwritten without --overwrite).",
)
@click.option(
    "--weights",
    default=None,
    metavar="w1,...,wN",
    help="Weight of each model (normalised to sum 1), for the means models align to and for the output: "
    "finite, >= 0, the reference's > 0. Default: equal.",
)
@click.option(
    "--ref",
    type=click.Path(path_type=pathlib.Path),
    default=None,
    metavar="FILE",
    help="The input whose basis the output lives in (default: M1); it is never permuted.",
)
@click.option(
    "--max-passes",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Most MergeMany passes (stops earlier when a pass moves no model).",
)
@click.option(
    "--start",
    type=click.Choice(["auto", "incremental", "all-others"]),
    default="auto",
    show_default=True,
    help="First pass. auto: all-others until a model moves, then that pass restarts as incremental; "
    "models that share a basis (fine-tunes of one base) take one pass of N alignments (N - 1 and a "
    "check of the reference), permuted ones recover what incremental does (a few alignments more). "
    "incremental: each model is aligned to the mean of the models placed before it (the reference "
    "first); shared-basis models take 2N - 3 alignments. all-others (the paper's): each model is "
    "aligned to the mean of all the others in their own bases; shared-basis models take N - 1, but "
    "it loses badly on models in unrelated bases (every model permuted: the tiny benchmark's merge "
    "ends 133x farther from the base than ideal) and when only the reference is in another basis.",
)
@click.option(
    "--low-memory",
    is_flag=True,
    help="Match on float16 copies of the running sum and of the model being aligned (float32 inputs: "
    "half the memory; SDXL 13.5 GB less); the output is still summed in float32 from the files.",
)
@click.option(
    "--full-search",
    is_flag=True,
    help="Run weight matching's full products for every alignment. By default an alignment of the "
    "first pass is decided without them where a bound proves that nothing moves (models that share a "
    "basis); the answer is the same either way, bit for bit.",
)
@_common_options
@_reporting("merge-many")
def merge_many_cmd(
    models: tuple[pathlib.Path, ...],
    output: pathlib.Path,
    weights: str | None,
    ref: pathlib.Path | None,
    max_passes: int,
    start: str,
    low_memory: bool,
    full_search: bool,
    as_json: bool,
    **kw: Any,
) -> int:
    """Re-base N models into one basis (Git Re-Basin MergeMany) and write their weighted mean.

    M1 ... MN: at least 2 checkpoints of one family (.safetensors, .ckpt, .pt; fp8 scaled files
    dequantized exactly); a file given twice counts twice. Each model is aligned by weight matching to the weighted mean of the others,
    pass after pass, until no model moves. The output lives in the reference's basis and has its
    keys, so LoRAs and ControlNets made for the reference's base keep working. Memory does not
    grow with N.
    """
    from ..files.checkpoint import FAMILY_NAMES
    from .many_job import merge_many_files, parse_weights

    res = merge_many_files(
        models,
        output,
        weights=parse_weights(weights, len(models)),
        ref=ref if ref is not None else 0,
        max_passes=max_passes,
        start=start,
        low_memory=low_memory,
        full_search=full_search,
        options=_options(kw, as_json),
    )
    if as_json:
        _print_json(res.summary())
    elif not kw["quiet"]:
        family = FAMILY_NAMES.get(res.config, res.config)
        click.echo(f"wrote {res.output} ({family}, {len(res.inputs)} models, {_fmt_bytes(res.output_bytes)})")
        last = res.passes[-1]
        if res.converged:
            state = "converged"
        elif len(res.passes) < max_passes:  # --iters 0: no model can move, one pass says so
            state = "stopped: --iters 0 aligns nothing (a plain weighted mean)"
        else:
            state = "stopped at --max-passes"
        click.echo(
            f"MergeMany: {len(res.passes)} pass(es), {state}; {len(res.steps)} alignment(s) ({res.start} start); "
            f"objective {last.objective:.8g}; "
            f"reference {res.inputs[res.ref]}; permutations moved per model: "
            + ", ".join(str(n) for n in res.permutations_changed)
            + f" of {res.permutations}"
        )
        if res.equals_weighted_mean:
            click.echo(
                "MergeMany: nothing moved: the merge equals the weighted mean of the inputs "
                "(every model already in the reference's basis)"
            )
        click.echo(
            f"done in {res.seconds:.1f} s (alignment {res.align_seconds:.1f} s, output {res.output_seconds:.1f} s)"
        )
    return 0


@cli.command("inspect")
@click.argument("file", type=click.Path(path_type=pathlib.Path))
@click.option("-v", "--verbose", is_flag=True, help="List every permutation and every permuted key.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object on stdout (with the error and exit code if the file cannot be read).",
)
@_reporting("inspect")
def inspect_cmd(file: pathlib.Path, verbose: bool, as_json: bool) -> int:
    """Show a checkpoint's family, keys, dtypes and what re-basin permutes in it."""
    from .jobs import describe_checkpoint

    info = describe_checkpoint(file, verbose)
    if as_json:
        info.pop("spec", None)
        _print_json(info)
        return 0 if info["problem"] is None else 1
    click.echo(f"file:        {info['file']} ({info['format']}, {_fmt_bytes(info['bytes'])})")
    click.echo(f"family:      {info['family']} (sd-mecha config {info['config']})")
    click.echo(f"keys:        {info['keys']} ({info['parameters']:,} parameters)")
    click.echo("dtypes:      " + ", ".join(f"{k} ({n})" for k, n in info["dtypes"].items()))
    click.echo("parts:       " + ", ".join(f"{k} ({n})" for k, n in info["parts"].items()))
    layout = info["layout"]
    if layout["source"] != "canonical":
        click.echo(
            f"layout:      {layout['source']}: {layout['renamed']} keys renamed (e.g. {layout['example']}), "
            "read as the canonical layout"
        )
    for note in layout.get("notes", []):
        click.echo(f"note:        {note}")
    if info["markers"]:
        click.echo("markers:     " + ", ".join(info["markers"]) + f" ({info['prediction']})")
    if info["variant"] is not None:
        click.echo(f"variant:     {info['variant']} ({info['input_channels']} UNet input channels)")
    if info["quantization"]:
        click.echo(f"quantized:   {info['quantization']} (read dequantized, float32)")
    if info["extra_bytes"]:
        click.echo(f"extra bytes: {info['extra_bytes']} (belong to no tensor; ignored)")
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
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON summary object on stdout (the error and exit code if it fails).",
)
@_reporting("demo")
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
        _print_json(report)
    return 0 if report["recovered"] else 1


# --------------------------------------------------------------------------------------------
# Entry point


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 error, 2 usage, 130 interrupted).

    `argv=None` is the real command line (sys.argv); a list runs in-process (tests, embedding).
    SIGTERM is handled like Ctrl-C while it runs, so that temporary files are removed. Ctrl-C
    before the command starts (while the package imports) has its own guard (`common.launch`),
    which the command ends once the package is imported (`_reporting`).
    """
    if not import_deferred():
        end_start_guard()
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread (embedded use)
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    global _report
    _report = None
    debug = os.environ.get("SD_REBASIN_DEBUG", "") not in ("", "0")
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name=PROG, standalone_mode=False)
        return int(code or 0)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx is not None else str(e))
        return 0
    except click.UsageError as e:
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        if _report is None and json_requested(argv if argv is not None else sys.argv[1:]):  # no command ran
            named = e.ctx is not None and e.ctx.parent is not None
            _report = _Report(e.ctx.info_name if named else None, True)
        return _fail(e.format_message().replace("\n", " ") + where, 2)
    except UserError as e:
        if debug:
            raise
        return _fail(str(e), e.exit_code)
    except click.ClickException as e:
        return _fail(e.format_message(), e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        code = _fail(INTERRUPTED, 130)
        if argv is None:
            _exit_now(code)
        return code
    except MemoryError:
        return _fail("out of memory (try fewer --threads, or a machine with more RAM)", 1)
    except BrokenPipeError:
        return 1
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback; SD_REBASIN_DEBUG=1 shows it
        if debug:
            raise
        return _fail(
            f"internal error: {type(e).__name__}: {_first_line(str(e))} (set SD_REBASIN_DEBUG=1 for the traceback)",
            1,
        )


def _fail(message: str, code: int) -> int:
    """The error line on stderr and, under `--json`, the failure object on stdout; returns `code`."""
    _error(message)
    if _report is not None and _report.as_json:
        with contextlib.suppress(OSError):  # a closed stdout: the line on stderr is all there is
            _print_json({"command": _report.command, "error": message, "exit_code": code})
    return code


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
