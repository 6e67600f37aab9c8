"""The jobs behind the command line, as library functions: merge, align, plain average, inspect.

`run(mode, a, b, output, RunOptions(...))` checks both files, builds the sd-mecha recipe, merges,
keeps what the key policy says and writes the output atomically with its metadata; it raises
`UserError` (one line naming the file and the problem) for anything the user can fix.
`merge_files` and `align_files` are its two everyday forms; `describe_checkpoint` is `inspect`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import pathlib
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..architectures.small import DEMO_LAYOUT, DEMO_LAYOUT_KEY
from ..common import events, testhooks
from ..common.devices import cuda_devices
from ..common.errors import UserError
from ..files import key_kinds
from ..files.checkpoint import (
    FAMILY_NAMES,
    Checkpoint,
    check_finite,
    check_pair,
    component_of_keys_cached,
    detect_family,
    ema_map,
    is_merged_key,
    merge_policy,
    open_checkpoint,
    release_pickles,
    validate,
)
from ..files.output import AtomicOutput, anonymize_recipe, build_metadata, legacy_hash, sha256_file
from ..files.repairs import repair_position_ids
from ..files.variants import check_variant_pair, input_channels, variant_of
from ..mecha import recipes
from ..mecha.blocks import Alpha
from ..model_configs.unet_only import ldm_names
from .progress import Progress, capture_logging, warn

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_LABELS = {
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
    alpha: float | dict[str, float] | None
    """B's weight, or block name -> B's weight for per-block alpha (MBW)."""
    sweeps: int
    converged: bool
    objective_start: float
    objective: float
    rel_distance: float
    permutations: int
    permutations_changed: int
    """Permutations that are not the identity."""
    units: int
    """Units (channels, head rows) over all permutations: the sum of their sizes."""
    units_moved: int
    """Units that a permutation sends elsewhere; 0: the merge is the plain weighted sum of A and B."""
    prepass_seconds: float
    seconds: float
    output_bytes: int
    kept: dict[str, int]
    left_out: int
    perms: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)
    merged_parts: str | None = None
    """One line on what was merged where a model is UNet-only (`unet_only_note`); None otherwise."""
    kept_from: str = "A"
    """The input ("A" or "B") whose keys and layout the output has (B for an alignment, and for a
    merge of a UNet-only A with a full B)."""

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
            "units": self.units,
            "units_moved": self.units_moved,
            "equals_plain_weighted_sum": self.units_moved == 0,
            "prepass_seconds": round(self.prepass_seconds, 3),
            "seconds": round(self.seconds, 3),
            "output_bytes": self.output_bytes,
            "kept_keys": self.kept,
            "left_out_keys": self.left_out,
            "merged_parts": self.merged_parts,
            "layout_from": self.kept_from,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        if self.alpha is None:
            del out["alpha"]
        if self.command != "merge":
            del out["equals_plain_weighted_sum"]
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}


def units_moved(perm: Any) -> int:
    """Units that the permutation `perm` (unit -> source unit) does not leave in place."""
    perm = np.asarray(perm)
    return int(np.count_nonzero(perm != np.arange(len(perm))))


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# --------------------------------------------------------------------------------------------
# The pipeline shared by merge and align


def check_device(device: str) -> str:
    """Normalise `--device`; UserError when CUDA is asked for but torch sees no GPU."""
    device = device.strip().lower()
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        visible = cuda_devices()
        if not visible:
            why = (
                "this torch build has no CUDA support"
                if torch.version.cuda is None
                else "torch sees no CUDA GPU"
            )
            raise UserError(f"--device {device}: no GPU available ({why}); use --device cpu")
        if ":" in device:
            index = int(device.split(":", 1)[1]) if device.split(":", 1)[1].isdigit() else -1
            if not 0 <= index < visible:
                raise UserError(f"--device {device}: no such GPU ({visible} visible)")
        return device
    raise UserError(f"--device {device!r}: expected cpu or cuda", exit_code=2)


def load_inputs(
    a_path: pathlib.Path, b_path: pathlib.Path, opts: RunOptions, mode: str = "merge"
) -> tuple[Checkpoint, Checkpoint, RunOptions]:
    """Open, identify and validate both models from their headers (the NaN/Inf scan comes later).

    `mode` ("merge", "average" or "align") decides which input-channel variants pair up (see
    `variants.check_variant_pair`: a merge needs an inpainting/instruct-pix2pix model as A).

    When a file written by `sd-rebasin demo` (marked in its metadata) takes part, both are checked
    against the demo's small layout instead of the family's: a full-size model then fails validation.
    """
    a = open_checkpoint(a_path)
    detect_family(a)
    b = open_checkpoint(b_path)
    detect_family(b)
    check_pair(a, b)
    if opts.shapes is None and any(c.metadata.get(DEMO_LAYOUT_KEY) == DEMO_LAYOUT for c in (a, b)):
        from ..architectures.small import SMALL_ARCH, small_shapes

        opts = dataclasses.replace(opts, arch=SMALL_ARCH, shapes=small_shapes())
    validate(a, opts.shapes)
    validate(b, opts.shapes)
    check_variant_pair(a.name, a.full_shapes(), b.path, b.full_shapes(), mode)
    warn_extra_bytes((a, b), opts.quiet)
    warn_layout_notes((a, b), opts.quiet)
    if same_files([a.path, b.path]) and not opts.quiet:
        names = f"both {a.name}" if a.name == b.name else f"one file ({a.name} and {b.name})"
        what = "the output is that model" if mode == "align" else "the merge gives that model back"
        warn(f"A and B are {names}; {what}")
    return a, b, opts


def check_spec(ckpt: Checkpoint, opts: RunOptions, others: Sequence[Checkpoint] = ()) -> None:
    """Refuse, before the merge, a model whose permutation spec cannot be built from its keys
    (milliseconds: the spec is built from the header's shapes). Raises UserError naming the file
    and the missing key.

    The text encoders take part only where every model of the merge (`ckpt` and `others`) has
    them, as the merge method decides (`present_text_encoders`): with a UNet-only model, only the
    UNets are re-based, and the cross-attention columns that read the text encoder stay as they are.
    """
    from ..architectures import permutation_spec, present_text_encoders
    from ..permutations.spec import MissingKeyError

    assert ckpt.config is not None
    shapes = ckpt.canonical_shapes()
    encoders = present_text_encoders(ckpt.config, shapes, *(o.canonical_shapes() for o in others))
    try:
        permutation_spec(ckpt.config, arch=opts.arch, shapes=shapes, text_encoders=encoders)
    except MissingKeyError as e:
        part = "UNet" if e.key.startswith("model.diffusion_model.") or ckpt.unet_only else "text encoder"
        raise UserError(
            f"cannot be re-based: it lacks {e.key} ({part}); the permutation rules need every "
            f"{part} key of {ckpt.family}",
            ckpt.path,
        ) from None
    except ValueError as e:
        raise UserError(f"cannot be re-based: {e}", ckpt.path) from None


def same_files(paths: Sequence[pathlib.Path]) -> list[list[int]]:
    """The inputs that are one file, as groups of indices into `paths` (each in order, 2 or more):
    a path given twice, a symbolic link beside its target, two hard links."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, path in enumerate(paths):
        stat = path.stat()
        groups.setdefault((stat.st_dev, stat.st_ino), []).append(i)
    return [group for group in groups.values() if len(group) > 1]


def same_file_text(paths: Sequence[pathlib.Path], group: Sequence[int]) -> str:
    """`group` (from `same_files`) named by every name it was given under, with its input numbers:
    "m1.safetensors is given twice (inputs 1 and 3)", "m1.safetensors and link.safetensors are one
    file (inputs 1 and 2)" (the paths as given where two names are alike in other folders)."""
    shown = list(dict.fromkeys(paths[i].name for i in group))
    given = list(dict.fromkeys(str(paths[i]) for i in group))
    if len(shown) < len(given):
        shown = given
    inputs = _and([str(i + 1) for i in group])
    if len(shown) == 1:
        return f"{shown[0]} is given {times(len(group))} (inputs {inputs})"
    return f"{_and(shown)} are one file (inputs {inputs})"


def times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def warn_extra_bytes(ckpts: Sequence[Checkpoint], quiet: bool) -> None:
    """One warning per input whose file holds bytes that belong to no tensor (accepted as they are)."""
    for ckpt in ckpts:
        if ckpt.extra_bytes and not quiet:
            warn(
                f"{ckpt.name}: {ckpt.extra_bytes} byte(s) after or between its tensors belong to no tensor; "
                "ignored (its header describes every tensor)"
            )


def warn_layout_notes(ckpts: Sequence[Checkpoint], quiet: bool) -> None:
    """One warning per note of an input's key layout (`key_layouts.Layout.notes`)."""
    for ckpt in ckpts if not quiet else []:
        for note in ckpt.layout.notes if ckpt.layout is not None else []:
            warn(f"{ckpt.name}: {note}")


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


def _rebasin_options(opts: RunOptions) -> dict[str, Any]:
    """The options of `git_rebasin` / `git_rebasin_many` that the command line sets."""
    return {
        "iters": opts.iters,
        "seed": opts.seed,
        "threads": opts.threads,
        "device": opts.device,
        "precision": opts.precision,
    }


def _arch(config: str, arch: Mapping[str, Mapping[str, Any]] | None) -> contextlib.AbstractContextManager:
    """The merge method's architecture override for small models (nothing for real checkpoints)."""
    if not arch:
        return contextlib.nullcontext()
    from ..mecha.merge_method import arch_override

    return arch_override(config, arch)


def _perm_spec(config: str, opts: RunOptions, text_encoders: Sequence[str] | None = None):
    from ..architectures import permutation_spec

    return permutation_spec(config, arch=opts.arch, shapes=opts.shapes, text_encoders=text_encoders)


def layout_base(mode: str, a: Checkpoint, b: Checkpoint) -> Checkpoint:
    """The input whose keys, layout and config the output has: B for an alignment; for a merge A,
    unless A is UNet-only and B is not (the full model's text encoders and VAE pass through)."""
    if mode == "align" or (a.unet_only and not b.unet_only):
        return b
    return a


def unet_only_note(a: Checkpoint, b: Checkpoint, base: Checkpoint) -> str | None:
    """What a merge with a UNet-only model merges, in one line (None when neither is UNet-only)."""
    lacking = [c for c in (a, b) if c.unet_only]
    if not lacking:
        return None
    if len(lacking) == 2:
        if all(_has_vae(c) for c in lacking):  # an SDXL file of UNet + VAE
            return (
                f"{a.name} and {b.name} have no text encoder (UNet + VAE only): the UNets and VAEs are merged"
            )
        return f"merged the UNets only: both models are UNet-only (output in the key layout of {base.name})"
    full = b if lacking[0] is a else a
    return (
        f"merged the UNets only: {lacking[0].name} is UNet-only; the text encoders and VAE of "
        f"{full.name} pass through as they are (not aligned)"
    )


def _has_vae(ckpt: Checkpoint) -> bool:
    return any(k.startswith("first_stage_model.") for k in ckpt.canonical.values())


def _kept_category(config: str, key: str) -> str:
    """The summary's name for a kept key: its `key_kinds` row, else "unknown" / "buffers"."""
    component = component_of_keys_cached(config).get(key)
    kind = key_kinds.kind_of(key, component)
    if kind is not None:
        return kind.name
    return "unknown" if component is None else "buffers"


_policy = merge_policy


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
    in the other model are left out (returned as a count). CLIP `position_ids` are always the exact
    int64 0..76, added or replaced with a warning when the base model's are missing or broken.
    """
    base = layout_base(mode, a, b)
    other = a if base is b else b
    config = base.config
    assert config is not None
    out: dict[str, torch.Tensor] = {}
    kept: collections.Counter[str] = collections.Counter()
    to_keep: list[str] = []
    for key in base.shapes:
        canon = base.canonical.get(key, key)
        if _policy(config, canon) == key_kinds.DROPPED:
            kept["dropped"] += 1
            continue
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
            from ..permutations.spec import permute_tensor

            tensor = permute_tensor(spec, emas[key], tensor, dict(perms))
            kept["ema_permuted"] += 1
        else:
            kept["weights" if weight and key not in emas else _kept_category(config, canon)] += 1
        if weight and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        out[canon] = tensor
    from_other = [  # kinds kept from whichever side has them (key_kinds: kept_from_either)
        k
        for k in other.shapes
        if other.canonical.get(k, k) not in out
        and _policy(config, other.canonical.get(k, k)) == key_kinds.KEPT_FROM_EITHER
    ]
    for key, tensor in other.iter_tensors(from_other):
        out[other.canonical.get(key, key)] = tensor
        kept[f"{_kept_category(config, other.canonical.get(key, key))} (from {other.name})"] += 1
    repaired = repair_position_ids(config, out)
    if repaired and not opts.quiet:
        warn(f"{base.name}: {'; '.join(repaired)}; the output holds the exact int64 position ids")
    names = ldm_names(config)  # compared in the full config's names: the other may be of another layout
    base_keys = {names.get(k, k) for k in out}
    left_out = sum(
        1
        for k in other.full_shapes()
        if k not in base_keys and _policy(other.full_config, k) != key_kinds.DROPPED
    )
    return out, dict(kept), left_out


def run(
    mode: str,
    a_path: str | os.PathLike,
    b_path: str | os.PathLike,
    output: str | os.PathLike,
    opts: RunOptions,
    alpha: float | Alpha = 0.5,
) -> RunResult:
    """Merge (`mode="merge"`: (1 - alpha) * A + alpha * pi(B)) or align (`mode="align"`: pi(B)) to a file.

    `mode="average"` is the plain weighted sum (1 - alpha) * A + alpha * B, no re-basin (the demo's
    baseline), through the same checks and output. `alpha` may be per block (`blocks.parse_alpha`):
    each key then gets its block's alpha through sd-mecha's block conversions; a form that does not
    fit A's family is a UserError (exit code 2) before any work.
    """
    if mode not in ("merge", "align", "average"):
        raise ValueError(f"unknown mode {mode!r}")
    t0 = time.perf_counter()
    a_path, b_path, output = pathlib.Path(a_path), pathlib.Path(b_path), pathlib.Path(output)
    device = check_device(opts.device)
    opts = dataclasses.replace(opts, device=device)
    dtype = DTYPES[opts.output_dtype]
    a, b, opts = load_inputs(a_path, b_path, opts, mode)
    alpha_node, alpha_shown = _alpha(alpha, layout_base(mode, a, b).config)  # the recipe's config
    for ckpt in (a, b):
        if output.resolve() == ckpt.path.resolve():
            raise UserError(f"is an input ({'A' if ckpt is a else 'B'}); choose another output file", output)
    demo_layout = any(c.metadata.get(DEMO_LAYOUT_KEY) == DEMO_LAYOUT for c in (a, b))
    stop_hashing = threading.Event()
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd-rebasin-hash")
    try:
        hashes = hasher.submit(_hash_inputs, [a.path, b.path], stop_hashing) if opts.metadata else None
        with contextlib.ExitStack() as stack:
            target, recipe_target = open_targets(
                stack, output, opts, expected_output_bytes(mode, a, b, dtype)
            )
            progress = Progress(enabled=opts.progress and not opts.quiet, expect_prepass=mode != "average")
            stack.callback(progress.close)
            stack.enter_context(events.listening(progress))
            if mode != "average":  # headers only: refused in milliseconds, before any file is read
                for ckpt in (a, b):
                    check_spec(ckpt, opts, [b if ckpt is a else a])
            _scan_inputs((a, b), opts.threads)
            _warn_prediction_mismatch(mode, a, b, opts.quiet)
            base = layout_base(mode, a, b)
            parts = unet_only_note(a, b, base)
            if parts is not None and not opts.quiet:
                warn(parts)

            config = base.config
            assert config is not None
            recipe = recipes.pair_recipe(mode, a, b, config, alpha_node, _rebasin_options(opts))

            merged: dict[str, Any] = {}
            input_bytes = sum(ckpt.path.stat().st_size for ckpt in (a, b))

            def merge() -> None:
                testhooks.pause("merging")
                recipes.merge_into(
                    recipe, merged, dtype, opts.threads or None, progress.tqdm_factory(), input_bytes
                )

            try:
                with capture_logging(opts.quiet), _arch(config, opts.arch), _reading_inputs():
                    _in_background(merge)
            finally:
                progress.close()
            mecha = merged.pop("__metadata__", {}).get("mecha_recipe")
            result = progress.result
            perms = dict(result.perms) if result is not None else {}
            tensors, kept, left_out = assemble(mode, a, b, merged, dtype, perms, opts)
            merged.clear()
            if left_out and not opts.quiet:
                other = a if base is b else b
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
                        "multiplier": None if mode == "align" else alpha_shown,
                        "alpha": None if mode == "align" else alpha_shown,
                        "iters": opts.iters,
                        "seed": opts.seed,
                        "sweeps": _sweeps(result),
                        "converged": bool(result.converged) if result is not None else None,
                        "rel_distance": result.rel_distance if result is not None else None,
                        "save_as_half": opts.output_dtype != "fp32",
                        "output_dtype": opts.output_dtype,
                        "config_source": config,
                    },
                    prediction_type=key_kinds.metadata_prediction(base.canonical.values()),
                )
                if demo_layout:
                    metadata[DEMO_LAYOUT_KEY] = DEMO_LAYOUT
            if recipe_target is not None and not mecha:
                raise UserError("sd-mecha could not serialize this recipe", opts.save_recipe)
            size = target.commit(tensors, metadata, _write_progress())
            events.emit("phase_end", phase="write")
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
        alpha=None if mode == "align" else alpha_shown,
        sweeps=_sweeps(result),
        converged=bool(result.converged) if result is not None else False,
        objective_start=float(first.objective) if first is not None else math.nan,
        objective=float(result.objective) if result is not None else math.nan,
        rel_distance=float(result.rel_distance) if result is not None else math.nan,
        permutations=len(perms),
        permutations_changed=sum(1 for p in perms.values() if units_moved(p)),
        units=sum(len(p) for p in perms.values()),
        units_moved=sum(units_moved(p) for p in perms.values()),
        prepass_seconds=progress.prepass_seconds,
        seconds=time.perf_counter() - t0,
        output_bytes=size,
        kept=kept,
        left_out=left_out,
        perms=perms,
        merged_parts=parts,
        kept_from="B" if base is b else "A",
    )


def _alpha(alpha: float | Alpha, config: str | None) -> tuple[Any, float | dict[str, float]]:
    """`weighted_sum`'s alpha for `config` (a number or a per-key recipe node) and its summary
    (the number, or block -> value)."""
    if not isinstance(alpha, Alpha):
        return alpha, alpha
    try:
        return alpha.node(config or ""), alpha.describe(config or "")
    except ValueError as e:
        raise UserError(str(e), exit_code=2) from e


@contextlib.contextmanager
def _reading_inputs() -> Any:
    """Name an OSError raised while sd-mecha reads the inputs (a file removed, a disk error) as one."""
    try:
        yield
    except OSError as e:
        where = e.filename if isinstance(e.filename, str) else None
        raise UserError(
            f"cannot read {'an input file' if where is None else 'it'}: {e.strerror or e}", where
        ) from None


def _write_progress() -> Callable[[int, int], None]:
    """`AtomicOutput.commit`'s progress callback as "write" phase events (started on the first call,
    when the file's size is known)."""
    started = False

    def wrote(done: int, total: int) -> None:
        nonlocal started
        if not started:
            started = True
            events.emit("phase_start", phase="write", total=total, unit="B")
        events.emit("phase", phase="write", done=done)

    return wrote


SCAN_PARTS = 32
"""The NaN/Inf scan runs over each model in this many runs of keys (progress between runs)."""


def _scan_inputs(ckpts: Sequence[Checkpoint], threads: int) -> None:
    """`check_finite` on each model, a run of keys (in file order) at a time, with "scan" progress
    events; the first bad key in file order is the error."""
    total = sum(len(c.shapes) for c in ckpts)
    events.emit("phase_start", phase="scan", total=total, unit="key")
    done = 0
    for ckpt in ckpts:
        keys = list(ckpt.shapes)
        step = max(1, -(-len(keys) // SCAN_PARTS))
        for lo in range(0, len(keys), step):
            check_finite(ckpt, keys[lo : lo + step], threads=threads or 0)
            done += len(keys[lo : lo + step])
            events.emit("phase", phase="scan", done=done)
    events.emit("phase_end", phase="scan")


def expected_output_bytes(mode: str, a: Checkpoint, b: Checkpoint, dtype: torch.dtype) -> int:
    """The tensor data `assemble` will write, in bytes, from the base model's header (A; B for an
    alignment): weights that take part in the merge and EMA copies of UNet weights in `dtype`,
    everything else as stored. The header and metadata (kilobytes) are not counted."""
    base = layout_base(mode, a, b)
    config = base.config
    assert config is not None
    canon = {key: base.canonical.get(key, key) for key in base.shapes}
    emas = ema_map(base.shapes, [c for c in canon.values() if c.startswith("model.diffusion_model.")])
    total = 0
    for key, shape in base.shapes.items():
        if _policy(config, canon[key]) == key_kinds.DROPPED:
            continue
        stored = base.dtypes[key]
        weight = key in emas or is_merged_key(config, canon[key], stored)
        total += math.prod(shape) * (dtype if weight and stored.is_floating_point else stored).itemsize
    return total


def open_targets(
    stack: contextlib.ExitStack, output: pathlib.Path, opts: RunOptions, expected_bytes: int
) -> tuple[AtomicOutput, AtomicOutput | None]:
    """The output file and, with `opts.save_recipe`, the recipe file, both written atomically
    (closed by `stack`); partial files that killed runs left beside them are removed and named,
    and the output's folder must have room for `expected_bytes` (UserError before any work)."""
    target = stack.enter_context(AtomicOutput(output, overwrite=opts.overwrite))
    recipe_target = None
    if opts.save_recipe is not None:
        recipe_target = stack.enter_context(AtomicOutput(opts.save_recipe, opts.overwrite, suffix=".mecha"))
    warn_stale_partials([target, recipe_target], opts.quiet)
    target.check_free_space(expected_bytes)
    return target, recipe_target


def warn_stale_partials(targets: Sequence[AtomicOutput | None], quiet: bool) -> None:
    """Say which partial files of killed runs were removed from the output folders."""
    removed = [path for target in targets if target is not None for path in target.removed_stale]
    if removed and not quiet:
        names = ", ".join(p.name for p in removed)
        warn(
            f"removed {len(removed)} partial file(s) that an interrupted run left in {removed[0].parent}: {names}"
        )


def _sweeps(result: Any) -> int:
    return max(0, len(result.history) - 1) if result is not None else 0


def _warn_prediction_mismatch(mode: str, a: Checkpoint, b: Checkpoint, quiet: bool) -> None:
    """One loud warning when the two models' prediction types (eps, v, EDM, from the markers of
    `key_kinds`) differ; the merge goes on."""
    if quiet:
        return
    text = key_kinds.prediction_mismatch(
        a.name, a.canonical.values(), b.name, b.canonical.values(), base_is_a=mode != "align"
    )
    if text is not None:
        warn(text)


# --------------------------------------------------------------------------------------------
# Click commands


def merge_files(
    a: str | os.PathLike,
    b: str | os.PathLike,
    output: str | os.PathLike,
    alpha: float | Alpha = 0.5,
    options: RunOptions | None = None,
) -> RunResult:
    """Write `(1 - alpha) * A + alpha * pi(B)` to `output`, B aligned to A by weight matching.

    Raises `UserError` for bad input (see `run`)."""
    return run("merge", a, b, output, options or RunOptions(), alpha=alpha)


def align_files(
    b: str | os.PathLike, ref: str | os.PathLike, output: str | os.PathLike, options: RunOptions | None = None
) -> RunResult:
    """Write B permuted into `ref`'s basis (the same function as B) to `output`."""
    return run("align", ref, b, output, options or RunOptions())


def describe_checkpoint(
    path: pathlib.Path, verbose: bool = False, opts: RunOptions | None = None
) -> dict[str, Any]:
    """What `inspect` reports about one file."""
    opts = opts or RunOptions()
    try:
        ckpt = open_checkpoint(path)
        config = detect_family(ckpt)
        if opts.shapes is None and ckpt.metadata.get(DEMO_LAYOUT_KEY) == DEMO_LAYOUT:
            from ..architectures.small import SMALL_ARCH, small_shapes

            opts = dataclasses.replace(opts, arch=SMALL_ARCH, shapes=small_shapes())
        problem = None
        try:
            validate(ckpt, opts.shapes)
        except UserError as e:
            problem = e.problem
        dtypes = collections.Counter(DTYPE_LABELS.get(d, str(d)) for d in ckpt.dtypes.values())
        parts: collections.Counter[str] = collections.Counter()
        components = component_of_keys_cached(config)
        for key in ckpt.shapes:
            canon = ckpt.canonical.get(key, key)
            parts[components.get(canon, "unknown")] += 1
        info: dict[str, Any] = {
            "file": str(path),
            "format": ckpt.kind,
            "quantization": ckpt.quantized.format if ckpt.quantized is not None else None,
            "bytes": path.stat().st_size,
            "family": ckpt.family,
            "config": config,
            "keys": len(ckpt.shapes),
            "parameters": ckpt.parameters(),
            "dtypes": dict(dtypes.most_common()),
            "parts": dict(parts.most_common()),
            "markers": sorted(
                k for k in ckpt.canonical.values() if getattr(key_kinds.kind_of(k), "name", None) == "markers"
            ),
            "prediction": key_kinds.prediction_of(ckpt.canonical.values()),
            "layout": ckpt.layout.describe()
            if ckpt.layout is not None
            else {"source": "canonical", "renamed": 0},
            "kinds": dict(
                collections.Counter(
                    kind.name + " (" + kind.policy + ")"
                    for k in ckpt.canonical.values()
                    if (kind := key_kinds.kind_of(k, components.get(k))) is not None
                )
            ),
            "unet_only": ckpt.unet_only,
            "variant": variant_of(ckpt.full_shapes()),
            "input_channels": input_channels(ckpt.full_shapes()),
            "extra_bytes": ckpt.extra_bytes,
            "modelspec": {
                k: v
                for k, v in ckpt.metadata.items()
                if k.startswith("modelspec.") and k != "modelspec.thumbnail"
            },
            "merge_recipe": "sd_merge_recipe" in ckpt.metadata or "mecha_recipe" in ckpt.metadata,
            "problem": problem,
        }
        if problem is None:
            from ..architectures import present_text_encoders

            spec = _perm_spec(config, opts, present_text_encoders(config, ckpt.canonical_shapes()))
            info["spec"] = spec.describe(verbose=verbose)
            info["spec_summary"] = spec.summary()
            info["permuted_keys"] = sum(1 for k in ckpt.canonical.values() if k in spec.axes)
        return info
    finally:
        release_pickles()
