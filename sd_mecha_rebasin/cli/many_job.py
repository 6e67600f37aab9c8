"""The merge-many job: N checkpoint files re-based into the reference's basis and averaged, to a file.

`merge_many_files(paths, output, ...)` checks every file from its header first (family, layout,
NaN/Inf), then runs MergeMany (`many.merge_many`) on lazily read inputs, writes the weighted mean of
the aligned models key by key (`many.merged_tensors`), keeps the reference's other keys as the pair
merge does (`jobs.assemble`), and writes the output atomically with metadata naming every input and
its sha256. Every problem the user can fix is a one-line `UserError`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..architectures import present_text_encoders
from ..architectures.small import DEMO_LAYOUT, DEMO_LAYOUT_KEY
from ..common.errors import UserError
from ..files import key_kinds
from ..files.checkpoint import (
    FAMILY_NAMES,
    Checkpoint,
    check_finite,
    check_pair,
    detect_family,
    is_merged_key,
    open_checkpoint,
    release_pickles,
    validate,
)
from ..files.lazy import FileStateDict
from ..files.output import PACKAGE, anonymize_recipe, input_records, metadata_fields, package_version
from ..files.variants import VARIANTS, input_channels
from ..mecha import recipes
from ..search.many import (
    DEFAULT_MAX_PASSES,
    DEFAULT_START,
    STARTS,
    ModelStep,
    NonFinite,
    OutOfRange,
    PassStats,
    SumRebuild,
    check_weights,
    emit_progress,
    merge_many,
    merged_tensors,
)
from .jobs import (
    DTYPES,
    RunOptions,
    _hash_inputs,
    _perm_spec,
    _rebasin_options,
    assemble,
    check_device,
    check_spec,
    expected_output_bytes,
    open_targets,
    same_file_text,
    same_files,
    times,
    warn_extra_bytes,
    warn_layout_notes,
)
from .progress import ManyProgress, capture_logging, warn


@dataclasses.dataclass
class ManyRunResult:
    """What a merge-many did (the --json summary is built from it)."""

    output: pathlib.Path
    config: str
    inputs: list[str]
    weights: list[float]
    ref: int
    passes: list[PassStats]
    converged: bool
    sum_dtype: str
    """The running sum's dtype ("float16", "bfloat16", "float32")."""
    permutations: int
    permutations_changed: list[int]
    """Per input, its permutations that are not the identity (the reference's: 0)."""
    steps: list[ModelStep]
    """Every alignment, in the order run."""
    start: str
    low_memory: bool
    full_search: bool
    align_seconds: float
    output_seconds: float
    seconds: float
    output_bytes: int
    kept: dict[str, int]
    left_out: int
    restarted: bool = False
    """`--start auto`: a model moved in the all-others first pass, which restarted incrementally."""

    @property
    def equals_weighted_mean(self) -> bool:
        """No model of weight > 0 was permuted: the output is the weighted mean of the inputs as they are."""
        return not any(n for n, w in zip(self.permutations_changed, self.weights) if w > 0)

    def summary(self) -> dict[str, Any]:
        from .jobs import peak_rss_bytes

        out = {
            "command": "merge-many",
            "output": str(self.output),
            "family": FAMILY_NAMES.get(self.config, self.config),
            "config": self.config,
            "inputs": self.inputs,
            "weights": self.weights,
            "ref": self.inputs[self.ref],
            "converged": self.converged,
            "running_sum_dtype": self.sum_dtype,
            "start": self.start,
            "low_memory": self.low_memory,
            "full_search": self.full_search,
            "restarted": self.restarted,
            "passes": [dataclasses.asdict(p) for p in self.passes],
            "alignments": [{"name": self.inputs[s.model], **dataclasses.asdict(s)} for s in self.steps],
            "equals_weighted_mean": self.equals_weighted_mean,
            "permutations": self.permutations,
            "permutations_changed": self.permutations_changed,
            "align_seconds": round(self.align_seconds, 3),
            "output_seconds": round(self.output_seconds, 3),
            "seconds": round(self.seconds, 3),
            "output_bytes": self.output_bytes,
            "kept_keys": self.kept,
            "left_out_keys": self.left_out,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        return out


def parse_weights(text: str | None, n: int) -> list[float] | None:
    """`"w1,...,wN"` -> floats (None stays None); UserError (usage) for a bad list."""
    if text is None:
        return None
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--weights {text!r}: expected {n} comma-separated numbers", exit_code=2) from None
    return weights


def _check_weights(weights: Sequence[float] | None, n: int, ref: int) -> list[float]:
    try:
        return check_weights(weights, n, ref)
    except ValueError as e:
        raise UserError(f"--weights: {e}", exit_code=2) from None


def _odd_family(ckpts: Sequence[Checkpoint], ref: int) -> None:
    """UserError naming the first file whose family differs from most inputs' (ties: the reference's)."""
    counts = collections.Counter(c.config for c in ckpts)
    top = max(counts.values())
    majority = ckpts[ref].config if counts[ckpts[ref].config] == top else counts.most_common(1)[0][0]
    for ckpt in ckpts:
        if ckpt.config != majority:
            example = next(c for c in ckpts if c.config == majority)
            if ckpt.full_config == example.full_config:  # one family, two key layouts
                raise UserError(
                    f"has the key layout of {ckpt.config} but {example.name} has that of {majority}; "
                    "merge-many takes models of one key layout (convert them, or merge pairs with merge)",
                    ckpt.path,
                )
            raise UserError(
                f"is {ckpt.family} ({ckpt.config}) but {example.name} is {example.family} ({majority})"
                f"{' like the other inputs' if counts[majority] > 1 else ''}; all models must be of the same family",
                ckpt.path,
            )
    kinds = {c.unet_only for c in ckpts}
    if len(kinds) > 1:  # MergeMany averages every key over all models: one kind only
        odd = next(c for c in ckpts if c.unet_only != ckpts[ref].unet_only)
        example = ckpts[ref]
        what = "is UNet-only" if odd.unet_only else "has text encoders"
        raise UserError(
            f"{what} but {example.name} {'has text encoders' if odd.unet_only else 'is UNet-only'}; "
            "merge-many takes all UNet-only models or all full checkpoints (merge pairs of the two with merge)",
            odd.path,
        )


def load_many(
    paths: Sequence[pathlib.Path], ref: int, opts: RunOptions
) -> tuple[list[Checkpoint], RunOptions]:
    """Open, identify and validate every input from its header; warn about a file given twice."""
    ckpts = []
    for path in paths:
        ckpt = open_checkpoint(path)
        detect_family(ckpt)
        ckpts.append(ckpt)
    _odd_family(ckpts, ref)
    for ckpt in ckpts:
        if ckpt is not ckpts[ref]:
            check_pair(ckpts[ref], ckpt)
    if opts.shapes is None and any(c.metadata.get(DEMO_LAYOUT_KEY) == DEMO_LAYOUT for c in ckpts):
        from ..architectures.small import SMALL_ARCH, small_shapes

        opts = dataclasses.replace(opts, arch=SMALL_ARCH, shapes=small_shapes())
    for ckpt in ckpts:
        validate(ckpt, opts.shapes)
    _same_variant(ckpts, ref)
    for ckpt in ckpts if not opts.quiet else []:  # one warning per input whose prediction type differs
        base = ckpts[ref]
        text = key_kinds.prediction_mismatch(
            base.name, base.canonical.values(), ckpt.name, ckpt.canonical.values()
        )
        if text is not None:
            warn(text)
    warn_extra_bytes(ckpts, opts.quiet)
    warn_layout_notes(ckpts, opts.quiet)
    for group in same_files([c.path for c in ckpts]) if not opts.quiet else []:
        text = same_file_text([c.path for c in ckpts], group)
        warn(f"{text}: it counts {times(len(group))} in the mean")
    return ckpts, opts


def _same_variant(ckpts: Sequence[Checkpoint], ref: int) -> None:
    """Refuse inputs whose UNet takes another number of input channels than the reference's
    (inpainting 9, instruct-pix2pix 8, plain 4): their mean has no meaning for the extra channels."""
    want = input_channels(ckpts[ref].canonical_shapes())
    for ckpt in ckpts:
        have = input_channels(ckpt.canonical_shapes())
        if have != want:
            raise UserError(
                f"is {_a(VARIANTS.get(have, f'{have}-channel'))} model ({have} UNet input channels) but the "
                f"reference {ckpts[ref].name} is {_a(VARIANTS.get(want, f'{want}-channel'))} model ({want}): "
                "merge-many takes models of one kind (merge an inpainting model with a plain one with "
                "`sd-rebasin merge`, the inpainting model first)",
                ckpt.path,
            )


def _a(word: str) -> str:
    """`word` with its indefinite article ("an inpainting", "a standard", "an 8-channel")."""
    return f"{'an' if word.startswith(tuple('aeiou8') + ('11', '18')) else 'a'} {word}"


def _metadata(
    ckpts: Sequence[Checkpoint],
    ref: int,
    weights: Sequence[float],
    hashes: dict[str, tuple[str, str]],
    output: pathlib.Path,
    params: dict[str, Any],
    mecha_recipe: str | None,
) -> dict[str, str]:
    pkg_version = package_version()
    config = ckpts[ref].config
    assert config is not None
    shas = [hashes.get(c.name, (None, None))[0] for c in ckpts]
    recipe = {
        "type": PACKAGE,
        "version": pkg_version,
        "method": "git_rebasin_many(M1, ..., MN)",
        "interp_method": "Git Re-Basin MergeMany",
        "models": [c.name for c in ckpts],
        "model_hashes": shas,
        "weights": list(weights),
        "reference": ckpts[ref].name,
        **params,
    }
    terms = " + ".join(f"{w:.4g} * pi({c.name})" for c, w in zip(ckpts, weights))
    return metadata_fields(
        config=config,
        reference=ckpts[ref],
        output=output,
        recipe=recipe,
        models=input_records(ckpts, hashes),
        mecha_recipe=mecha_recipe,
        merged_from=[c.name for c in ckpts],
        description=f"Git Re-Basin MergeMany by {PACKAGE} {pkg_version}: {terms}, "
        f"every pi aligning into the basis of {ckpts[ref].name}",
        prediction_type=key_kinds.metadata_prediction(ckpts[ref].canonical.values()),
    )


def recipe_text(
    ckpts: Sequence[Checkpoint],
    weights: Sequence[float],
    ref: int,
    max_passes: int,
    opts: RunOptions,
    start: str = DEFAULT_START,
    low_memory: bool = False,
    full_search: bool = False,
) -> str:
    """The merge as an sd-mecha recipe (`git_rebasin_many` over the inputs), model paths as file names."""
    node = recipes.many_recipe(
        ckpts,
        weights=",".join(repr(float(w)) for w in weights),
        ref=ref,
        max_passes=max_passes,
        **_rebasin_options(opts),
        start=start,
        low_memory=low_memory,
        **({"full_search": True} if full_search else {}),
    )
    text = recipes.serialize(node)
    return anonymize_recipe(text, {str(c.path.resolve()): c.name for c in ckpts})


def _forward(
    on_progress: Callable[[ModelStep | SumRebuild | PassStats], None] | None,
) -> Callable[[ModelStep | SumRebuild | PassStats], None]:
    """Progress items to `events` listeners (as the merge method sends them), then to `on_progress`."""

    def forward(item: ModelStep | SumRebuild | PassStats) -> None:
        emit_progress(item)
        if on_progress is not None:
            on_progress(item)

    return forward


@contextlib.contextmanager
def _out_of_range(ckpts: Sequence[Checkpoint], threads: int) -> Iterator[None]:
    """`--low-memory` meeting a value float16 cannot hold, or NaN/Inf found in the permuted keys by
    MergeMany's first read: a one-line error naming the file (NaN/Inf: `check_finite`'s)."""
    try:
        yield
    except NonFinite as e:
        check_finite(ckpts[e.model], threads=threads)  # the file's first bad key, in file order
        raise UserError(f"{e.key} contains NaN or Inf values", ckpts[e.model].path) from None
    except OutOfRange as e:
        raise UserError(
            f"{e.key} holds values beyond {str(e.dtype).removeprefix('torch.')}'s range: "
            "--low-memory cannot round it; run without --low-memory",
            ckpts[e.model].path,
        ) from None


def merge_many_files(
    paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    ref: int | str | os.PathLike = 0,
    max_passes: int = DEFAULT_MAX_PASSES,
    start: str = DEFAULT_START,
    low_memory: bool = False,
    full_search: bool = False,
    options: RunOptions | None = None,
    on_progress: Callable[[ModelStep | SumRebuild | PassStats], None] | None = None,
) -> ManyRunResult:
    """Write the weighted mean of N checkpoints, each re-based into the reference's basis, to `output`.

    `ref` is an index into `paths` or one of the paths (default: the first). The output has the
    reference's keys (EMA weights, buffers and markers kept from it as `jobs.assemble` says) and
    lives in its basis. Memory: one float32 copy of the permuted weights plus one model, whatever
    N (see `many.merge_many`); `low_memory` matches on float16 copies (float32 inputs: half that).
    `start`: the first pass, "auto", "incremental" or "all-others" (`many.STARTS`). `full_search` runs
    weight matching's products for every alignment (the default proves "nothing moves" without
    them where it can: the same answer). Raises `UserError` for
    fewer than 2 files, bad weights, a `ref` that is not an input, an unknown `start`, mixed families (naming the odd file and both families), bad files, NaN/Inf,
    or an output that is an input or exists (without `overwrite`).
    """
    opts = options or RunOptions()
    t0 = time.perf_counter()
    paths = [pathlib.Path(p) for p in paths]
    output = pathlib.Path(output)
    if len(paths) < 2:
        raise UserError(f"merge-many needs at least 2 models, got {len(paths)}", exit_code=2)
    if not isinstance(ref, int):
        ref_path = pathlib.Path(ref)
        matches = [i for i, p in enumerate(paths) if p.resolve() == ref_path.resolve()]
        if not matches:
            raise UserError("--ref is not one of the input models", ref_path, exit_code=2)
        ref = matches[0]
    w = _check_weights(weights, len(paths), ref)
    if start not in STARTS:
        raise UserError(f"--start {start!r}: choose one of {', '.join(STARTS)}", exit_code=2)
    opts = dataclasses.replace(opts, device=check_device(opts.device))
    dtype = DTYPES[opts.output_dtype]
    ckpts, opts = load_many(paths, ref, opts)
    for ckpt in ckpts:
        if output.resolve() == ckpt.path.resolve():
            raise UserError("is an input; choose another output file", output)
    demo_layout = any(c.metadata.get(DEMO_LAYOUT_KEY) == DEMO_LAYOUT for c in ckpts)
    config = ckpts[ref].config
    assert config is not None
    stop_hashing = threading.Event()
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd-rebasin-hash")
    progress = ManyProgress(
        [c.name for c in ckpts], enabled=opts.progress and not opts.quiet, forward=_forward(on_progress)
    )
    try:
        hashes = hasher.submit(_hash_inputs, paths, stop_hashing) if opts.metadata else None
        with contextlib.ExitStack() as stack:
            target, recipe_target = open_targets(
                stack, output, opts, expected_output_bytes("merge", ckpts[ref], ckpts[ref], dtype)
            )
            mecha = recipe_text(ckpts, w, ref, max_passes, opts, start, low_memory, full_search)
            for ckpt in ckpts:  # headers only: refused in milliseconds, before any file is read
                check_spec(ckpt, opts, ckpts)
            # Text encoders take part only if every input has them (UNet-only inputs: none).
            spec = _perm_spec(
                config, opts, present_text_encoders(config, *(c.canonical_shapes() for c in ckpts))
            )
            scanned = start != "incremental"  # the first pass reads every model's permuted keys first
            for ckpt in ckpts:  # the rest now (the permuted keys too for "incremental"), before any work
                keys = [k for k in ckpt.shapes if not (scanned and ckpt.canonical.get(k, k) in spec.axes)]
                check_finite(ckpt, keys, threads=opts.threads or 0)
            models = [FileStateDict(c) for c in ckpts]
            t_align = time.perf_counter()
            with capture_logging(opts.quiet), _out_of_range(ckpts, opts.threads or 0):
                result = merge_many(
                    spec,
                    models,
                    weights=w,
                    ref=ref,
                    max_passes=max_passes,
                    max_iter=opts.iters,
                    seed=opts.seed,
                    threads=opts.threads or None,
                    device=opts.device,
                    precision=opts.precision,
                    start=start,
                    low_memory=low_memory,
                    full_search=full_search,
                    on_progress=progress,
                )
            align_seconds = time.perf_counter() - t_align
            t_out = time.perf_counter()
            base = ckpts[ref]
            merged_keys = [
                base.canonical.get(k, k)
                for k in base.shapes
                if is_merged_key(config, base.canonical.get(k, k), base.dtypes[k])
                and all(base.canonical.get(k, k) in m for m in models)
            ]
            progress.output_pass(len(merged_keys))
            merged = {}
            if result.mean is not None and result.sum_dtype == dtype:  # nothing moved: already summed
                merged = {key: result.mean[key] for key in merged_keys if key in result.mean}
                for _ in merged:
                    progress.key_done()
            result.mean = None
            for key, value in merged_tensors(
                spec,
                models,
                result.perms,
                weights=w,
                keys=[key for key in merged_keys if key not in merged],
                dtype=dtype,
                threads=opts.threads or None,
            ):
                merged[key] = value
                progress.key_done()
            merged = {key: merged[key] for key in merged_keys}  # the reference's order
            other = ckpts[1] if ref == 0 else ckpts[0]
            tensors, kept, _ = assemble("merge", base, other, merged, dtype, None, opts)
            merged.clear()
            base_keys = set(tensors)
            left_out = len({c.canonical.get(k, k) for c in ckpts for k in c.shapes} - base_keys)
            if left_out and not opts.quiet:
                warn(
                    f"{left_out} key(s) not in {base.name} left out (the output has the keys of the reference)"
                )
            metadata = None
            if opts.metadata:
                metadata = _metadata(
                    ckpts,
                    ref,
                    w,
                    hashes.result() if hashes is not None else {},
                    output,
                    {
                        "passes": result.passes,
                        "converged": result.converged,
                        "start": start,
                        "iters": opts.iters,
                        "seed": opts.seed,
                        "output_dtype": opts.output_dtype,
                        "config_source": config,
                    },
                    mecha,
                )
                if demo_layout:
                    metadata[DEMO_LAYOUT_KEY] = DEMO_LAYOUT
            size = target.commit(tensors, metadata)
            del tensors
            if recipe_target is not None:
                recipe_target.commit_text(mecha)  # no final newline: sd-mecha 1.1.8 cannot parse one
            output_seconds = time.perf_counter() - t_out
    finally:
        progress.close()
        stop_hashing.set()
        hasher.shutdown(wait=False, cancel_futures=True)
        release_pickles()
    changed = [
        sum(1 for p in perms.values() if not all(int(v) == j for j, v in enumerate(p)))
        for perms in result.perms
    ]
    return ManyRunResult(
        output=output,
        config=config,
        inputs=[c.name for c in ckpts],
        weights=w,
        ref=ref,
        passes=result.history,
        converged=result.converged,
        sum_dtype=str(result.sum_dtype).removeprefix("torch."),
        permutations=len(spec.spaces),
        permutations_changed=changed,
        steps=result.steps,
        start=start,
        low_memory=low_memory,
        full_search=full_search,
        align_seconds=align_seconds,
        output_seconds=output_seconds,
        seconds=time.perf_counter() - t0,
        output_bytes=size,
        kept=kept,
        left_out=left_out,
        restarted=result.restarted,
    )
