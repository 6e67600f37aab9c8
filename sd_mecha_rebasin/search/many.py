"""MergeMany (Git Re-Basin, Algorithm 3): N models brought into one basis and averaged.

Ainsworth, Hayase, Srinivasa, "Git Re-Basin" (ICLR 2023), Algorithm 3 and its code
(`mnist_mlp_wm_many.py`): repeat passes; in each pass visit the models in a seeded random order and
align model i by weight matching (`matching.weight_matching`) to the weighted mean of the other
N - 1 in their current bases; stop when a pass moves no model; output the weighted mean.

What this implementation adds, each explained in docs/many.md ("How it follows the paper"):
- a reference fixed at the identity, so the output lives in its basis;
- memory flat in N: one running weighted sum `S` (at the inputs' 16-bit type when they share one,
  rebuilt exactly from the models after a pass that moved something) plus the model being aligned;
- first passes (`STARTS`): "incremental", "all-others" (the paper's), and "auto" (all-others until
  a model moves, then that pass restarts incrementally), with the reference's check;
- models of weight 0 aligned once, after the others; `low_memory` matching on float16 copies;
- in the all-others pass, while `S` still holds the pass-start sum, an alignment that moves nothing
  leaves `S` bit for bit as it was, and is decided by the identity certificate (`certify.py`) in
  one read of the model where it applies: weight matching's answer without its products;
- the output pass (`merged_tensors`) sums the aligned models in float32 from the inputs, or, when
  nothing moved and `S` is still the rounded float32 sum, takes `S` (`ManyResult.mean`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor

import numpy as np
import torch

from ..common import events
from ..common.memory import return_freed_memory
from ..common.workers import worker_pool
from ..permutations.spec import (
    _SAME_SIZE_INT,
    Permutations,
    PermutationSpec,
    identity_permutation,
    permute_tensor,
)
from .certify import PassCentre, certified_alignment
from .matching import default_threads, weight_matching
from .matching import slice_dot as _dot

DEFAULT_MAX_PASSES = 100
"""The paper's code stops at 100 passes at the latest."""

STARTS = ("auto", "incremental", "all-others")
"""First passes: "incremental" aligns each model to the mean of the models placed before it (the
reference first); "all-others" (the paper's) to the mean of all the other models, every one in its
own basis, so inputs that already share a basis stop after one pass of N - 1 alignments; "auto"
runs all-others and restarts the pass incrementally as soon as a model moves (module docstring)."""

DEFAULT_START = "auto"

LOW_MEMORY_DTYPE = torch.float16
"""What `low_memory` holds the running sum and the model being aligned in when an input is wider.
float16, not bfloat16: 3 more mantissa bits (a rounding 8x finer, so near-ties between units are
decided as in float32 far more often), and its range holds every Stable Diffusion weight (fp16 is
how these checkpoints are published); a value beyond it is refused, never clipped."""


@dataclasses.dataclass(frozen=True)
class ModelStep:
    """One model aligned to the mean of the others (reported to `on_progress` as it finishes)."""

    pass_index: int
    position: int
    """1-based place of this model in the pass's visiting order."""
    visits: int
    """Models to visit in this pass."""
    model: int
    """Index of the model in the input list."""
    gain: float
    """Rise of `<mean of the others, pi_i(M_i)>` in this alignment: from the model's permutation
    before it (its own basis on a first visit) to the new one."""
    distance: float
    """`||mean of the others - pi_i(M_i)||` after the alignment (L2 over the spec's keys)."""
    changed: int
    """Permutations of this model that changed."""
    sweeps: int
    seconds: float
    units_moved: int = 0
    """Units (channels, head rows) that this alignment sent elsewhere, over all permutations."""
    units: int = 0
    """Units over all permutations (the sum of their sizes)."""
    distance_before: float = 0.0
    """`||mean of the others - pi_i(M_i)||` before the alignment (`distance` after it)."""
    zero_weight: bool = False
    """The model has weight 0: it is aligned (once the others have converged) but changes no target."""
    certified: int = 0
    """Spaces proved unmoved by the identity certificate's bound alone (`certify.py`)."""
    exact_rows: int = 0
    """Spaces proved unmoved with exact rows of the product."""
    searched: int = 0
    """Spaces solved by weight matching's full product and assignment."""


@dataclasses.dataclass(frozen=True)
class SumRebuild:
    """A 16-bit running sum is about to be rebuilt from the models (one read of each; reported to
    `on_progress` before it starts, as it takes about as long as a plain average of the N inputs)."""

    pass_index: int
    models: int


@dataclasses.dataclass(frozen=True)
class PassStats:
    """One pass over the models."""

    pass_index: int
    objective: float
    """`sum_{i<j} w_i w_j <pi_i(M_i), pi_j(M_j)>` after the pass (weights summing to 1, spec's keys):
    the sum of the pairwise terms of the paper's objective. No alignment lowers it."""
    mean_distance: float
    """Mean over the models aligned in this pass of `||mean of the others - pi_i(M_i)||`."""
    aligned: int
    """Models aligned (not skipped) in this pass."""
    models_changed: int
    """Models whose permutations changed in this pass."""
    permutations_changed: int
    """Permutations (spaces) that changed, over all models."""
    sweeps: int
    """Weight-matching sweeps run in this pass, over all models."""
    seconds: float
    rebuild_seconds: float = 0.0
    """Part of `seconds` spent rebuilding a 16-bit running sum from the models (0: not rebuilt)."""
    unmoved: bool = False
    """After this pass every model is still in its own basis (every permutation the identity): the
    merge so far is the weighted mean of the inputs as they are."""
    last: bool = False
    """No pass follows (converged, `max_passes` reached, or `max_iter=0`)."""
    centre_seconds: float = 0.0
    """Part of `seconds` spent on the identity certificate's centre (one product per space, once)."""


@dataclasses.dataclass
class ManyResult:
    perms: list[Permutations]
    """Per input model, the permutation into the reference's basis (the reference's: identity)."""
    history: list[PassStats]
    converged: bool
    """False when `max_passes` stopped the loop while a model could still move."""
    weights: list[float]
    """The weights used, normalised to sum to 1."""
    ref: int
    sum_dtype: torch.dtype = torch.float32
    """The dtype the running sum was held in (`running_sum_dtype`)."""
    steps: list[ModelStep] = dataclasses.field(default_factory=list)
    """Every alignment, in the order run."""
    start: str = DEFAULT_START
    low_memory: bool = False
    restarted: bool = False
    """`start="auto"`: a model (or the reference's check) moved in the all-others first pass, which
    was then restarted incrementally (the inputs do not share one basis)."""
    mean: dict[str, torch.Tensor] | None = None
    """When nothing moved and the running sum is still the exact rounding of the float32 weighted
    sum (16-bit inputs): the weighted mean over the spec's keys, in `sum_dtype`, bit for bit what
    `merged_tensors(..., dtype=sum_dtype)` gives; the output pass can take it instead of reading
    every model again. Else None."""

    @property
    def passes(self) -> int:
        return len(self.history)

    @property
    def alignments(self) -> int:
        return len(self.steps)

    @property
    def equals_weighted_mean(self) -> bool:
        """Every permutation is the identity: the merge is the weighted mean of the inputs as they are."""
        return all(_is_identity(p) for p in self.perms)


class NonFinite(ValueError):
    """Model `model` (0-based) holds NaN or Inf at `key` (found by the first read of every model)."""

    def __init__(self, model: int, key: str):
        self.model, self.key = model, key
        super().__init__(f"model {model + 1}: {key} contains NaN or Inf values")


class OutOfRange(ValueError):
    """`low_memory`: a value of model `model` (0-based) at `key` is beyond the 16-bit type's range."""

    def __init__(self, model: int, key: str, dtype: torch.dtype):
        self.model, self.key, self.dtype = model, key, dtype
        name = str(dtype).removeprefix("torch.")
        super().__init__(
            f"model {model + 1}: {key} holds values beyond {name}'s range (|x| > {torch.finfo(dtype).max:g}): "
            "low_memory cannot round it; run without it"
        )


def _is_identity(perms: Permutations) -> bool:
    return all(np.array_equal(p, np.arange(len(p))) for p in perms.values())


EVENTS = {ModelStep: "many_model", SumRebuild: "many_rebuild", PassStats: "many_pass"}
"""The `events` name of each progress item of `merge_many` (see `emit_progress`)."""


def emit_progress(item: ModelStep | SumRebuild | PassStats) -> None:
    """Send a `merge_many` progress item to `events` listeners: "many_model" {"step": ModelStep} as
    each model's result is known, "many_rebuild" {"rebuild": SumRebuild}, "many_pass" {"stats":
    PassStats}. A callback for `merge_many(on_progress=...)`."""
    name = EVENTS[type(item)]
    field = {"many_model": "step", "many_rebuild": "rebuild", "many_pass": "stats"}[name]
    events.emit(name, **{field: item})


def _normalised(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} models")
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight {i + 1} is {w}: weights must be finite and >= 0")
    try:
        total = math.fsum(weights)
    except OverflowError:  # huge weights (1e308, 1e308): only their ratios matter
        weights = [w / max(weights) for w in weights]
        total = math.fsum(weights)
    if total <= 0:
        raise ValueError("the weights sum to 0")
    return [w / total for w in weights]


def check_weights(weights: Sequence[float] | None, n: int, ref: int = 0) -> list[float]:
    """The weights normalised to sum to 1 (equal when None); ValueError for fewer than 2 models, a
    wrong length, a negative or non-finite weight, a zero sum, a bad `ref` or a zero weight on it."""
    if n < 2:
        raise ValueError(f"MergeMany needs at least 2 models, got {n}")
    if not 0 <= ref < n:
        raise ValueError(f"reference index {ref} is out of range for {n} models")
    w = _normalised(weights, n)
    if w[ref] == 0:
        raise ValueError(f"the reference (model {ref + 1}) has weight 0: the others are aligned to it")
    return w


def compose(first: Permutations, then: Permutations) -> Permutations:
    """The permutation that applies `first`, then `then` (as gathers: `first[then]` per space)."""
    return {name: p[then[name]] if name in then else p.copy() for name, p in first.items()}


def _load(
    spec: PermutationSpec,
    model: Mapping[str, torch.Tensor],
    keys: Iterable[str],
    perms: Permutations | None,
    fp8_as: torch.dtype = torch.float16,
    narrow: torch.dtype | None = None,
    exact_norm: list[float] | None = None,
    index: int = 0,
    copy: bool = True,
) -> dict[str, torch.Tensor]:
    """The model's `keys`, as tensors of our own, permuted by `perms` when given; fp8 tensors
    converted (exactly) to `fp8_as`, as torch has no arithmetic that mixes fp8 with other types.

    `narrow` (`low_memory`): tensors of another type are rounded to it (ValueError, naming model
    `index` + 1 and the key: `OutOfRange`, for a value beyond its range). `exact_norm` receives each key's squared
    norm before any rounding. Never a view of the caller's tensor (matching permutes the result in
    place: a view of an in-memory model, or of a cache behind a lazy one, would change it), unless
    `copy` is False (for a reader that changes nothing).
    """
    fresh = bool(getattr(model, "fresh_tensors", False))
    out = {}
    for key in keys:
        value = model[key]
        own = fresh
        if _is_fp8(value.dtype):
            value, own = value.to(fp8_as), True
        if exact_norm is not None:
            exact_norm.append(_dot(value, value))
        if narrow is not None and value.dtype != narrow:
            rounded = value.to(narrow)
            if not bool(torch.isfinite(rounded).all()):
                raise OutOfRange(index, key, narrow)
            value, own = rounded, True
        if perms is not None:
            permuted = permute_tensor(spec, key, value, perms)
            own = own or permuted is not value  # `take_along` always returns a new tensor
            value = permuted
        out[key] = value if own or not copy else value.clone()
    return out


def running_sum_dtype(models: Sequence[Mapping[str, torch.Tensor]], keys: Iterable[str]) -> torch.dtype:
    """The dtype `merge_many` holds its running sum in: the inputs' common 16-bit type when every
    model's `keys` are float16 (or bfloat16), else float32 (a wider key, or float16 mixed with
    bfloat16: neither holds the other). fp8 keys hold exactly in either and join the others' type
    (all fp8: float16). Lazy mappings with a `dtype(key)` method (`FileStateDict`) are not read."""
    keys = list(keys)
    kinds = set()
    for model in models:
        for key in keys:
            dtype = model.dtype(key) if callable(getattr(model, "dtype", None)) else model[key].dtype
            if dtype in (torch.float16, torch.bfloat16):
                kinds.add(dtype)
            elif not _is_fp8(dtype):
                return torch.float32
    if len(kinds) > 1:
        return torch.float32
    return kinds.pop() if kinds else torch.float16


def _is_fp8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def _holds(sum_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether a running sum in `sum_dtype` holds values of `dtype` exactly (fp8 fits any 16-bit type)."""
    return sum_dtype in (torch.float32, dtype) or _is_fp8(dtype)


class _Scaled(Mapping[str, torch.Tensor]):
    """`{key: factor * tensors[key]}`, computed when a key is read (no full-size scaled copy)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], factor: float):
        self.tensors, self.factor = tensors, factor

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.tensors[key]
        return value if self.factor == 1.0 else value * self.factor

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors


def _subtract_exactly(
    total: dict[str, torch.Tensor], model: Mapping[str, torch.Tensor], alpha: float, pool: Executor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`S -= alpha * M` in place (as `update` does), returning what `_add_back_exactly` needs to put
    every bit of `S` back: the elements that adding `alpha * M` again would not restore, and their
    values (a few percent of the elements). An alignment of the all-others pass that moves nothing
    then leaves `S` exactly the pass-start sum, as the identity certificate's alignments do."""
    undo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def one(key: str) -> None:
        before = total[key]
        after = before.clone().add_(model[key], alpha=-alpha)
        back = after.clone().add_(model[key], alpha=alpha)
        bits = _SAME_SIZE_INT[before.element_size()]
        lost = torch.nonzero((back.view(bits) != before.view(bits)).reshape(-1)).reshape(-1)
        undo[key] = (lost, before.reshape(-1)[lost].clone())
        before.copy_(after)

    list(pool.map(one, list(total)))
    return undo


def _add_back_exactly(
    total: dict[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    alpha: float,
    undo: dict[str, tuple[torch.Tensor, torch.Tensor]],
    pool: Executor,
) -> None:
    """Undo `_subtract_exactly` bit for bit (`model` as it was then)."""

    def one(key: str) -> None:
        value = total[key]
        value.add_(model[key], alpha=alpha)
        lost, original = undo[key]
        value.view(-1)[lost] = original

    list(pool.map(one, list(total)))


def merge_many(
    spec: PermutationSpec,
    models: Sequence[Mapping[str, torch.Tensor]],
    *,
    weights: Sequence[float] | None = None,
    ref: int = 0,
    max_passes: int = DEFAULT_MAX_PASSES,
    max_iter: int = 100,
    seed: int = 0,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    sum_dtype: torch.dtype | None = None,
    start: str = DEFAULT_START,
    low_memory: bool = False,
    full_search: bool = False,
    on_progress: Callable[[ModelStep | SumRebuild | PassStats], None] | None = None,
) -> ManyResult:
    """MergeMany: the permutations that bring N models into the reference's basis (Git Re-Basin, Alg. 3).

    `models` are state dicts in the checkpoint layout the spec was built for: plain dicts, or lazy
    mappings that read a tensor from a file when asked (`lazy.FileStateDict`); each is read once
    per alignment (and once per rebuild of a 16-bit running sum, and once at the start of
    `start="all-others"` or "auto"), and never changed. Memory: one running sum over the spec's keys present
    in the reference, in `sum_dtype` (default `running_sum_dtype`: the inputs' 16-bit type when all
    are 16-bit, else float32), plus one model being aligned, whatever N. Every model must have
    those keys.
    `weights` (default equal; normalised) weigh both the mean each model is aligned to and the
    output (`merged_tensors`); a model of weight 0 changes no target, so it is aligned once, after
    the others have converged. `start` is the first pass (`STARTS`): "incremental" aligns each
    model to the mean of those placed before it; "all-others" (the paper's) to the mean of all the
    others in their own bases, so models that already share a basis stop after one pass of N - 1
    alignments; "auto" (default) runs all-others until a model moves, then restarts that pass
    incrementally (module docstring): shared-basis inputs take one pass of N alignments (N - 1
    and a check of the reference), permuted ones recover what the incremental start does. `low_memory` matches on float16 copies of the sum and of the model being aligned
    (`LOW_MEMORY_DTYPE`; inputs already 16-bit stay as they are): half the memory for float32
    inputs; the objective and the output are still computed in float32 from the models.
    `max_iter`, `seed`, `threads`, `device`, `precision` go to `weight_matching`; the result is
    the same for any thread count. `on_progress` receives a `ModelStep` after each alignment, a
    `SumRebuild` before a 16-bit sum is rebuilt, and a `PassStats` after each pass.

    Raises ValueError for fewer than 2 models, bad weights (see `check_weights`), a bad `ref`, an
    unknown `start`, a `sum_dtype` that is not float32/float16/bfloat16 (or float32 with
    `low_memory`), a model that lacks one of the reference's permuted keys, or (`low_memory`) a
    value beyond float16's range.
    """
    n = len(models)
    w = check_weights(weights, n, ref)
    if max_passes < 1:
        raise ValueError(f"max_passes must be >= 1, got {max_passes}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}; got {start!r}")
    if low_memory and sum_dtype == torch.float32:
        raise ValueError("low_memory matches on a 16-bit sum: sum_dtype=float32 contradicts it")
    threads = threads or default_threads()
    keys = [key for key in spec.axes if key in models[ref]]
    for i, model in enumerate(models):
        missing = next((key for key in keys if key not in model), None)
        if missing is not None:
            raise ValueError(f"model {i + 1} lacks {missing}, which the reference (model {ref + 1}) has")
    fixed = sum_dtype is not None or low_memory
    if sum_dtype is None:
        # From what is known without reading: headers (`dtype(key)`) and in-memory dicts. A model
        # read through another lazy mapping is checked when it is first read (`admit`).
        known = [
            m for m in models if callable(getattr(m, "dtype", None)) or not getattr(m, "fresh_tensors", False)
        ]
        if known:
            sum_dtype = running_sum_dtype(known, keys)
        else:  # from the reference's first tensor; `admit` widens it if another needs float32
            sum_dtype = (
                running_sum_dtype([{k: models[ref][k] for k in keys[:1]}], keys[:1])
                if keys
                else torch.float32
            )
        if low_memory and sum_dtype == torch.float32:
            sum_dtype = LOW_MEMORY_DTYPE
    if sum_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"sum_dtype must be float32, float16 or bfloat16, got {sum_dtype}")
    compact = sum_dtype != torch.float32
    rounded = False  # S was 16-bit and widened to float32 since the last rebuild: rebuild once more
    u = [x / w[ref] for x in w]  # internal weights: the reference's is 1, so pass 1 of N = 2 is the pair
    # S holds `c * sum u_j pi_j(M_j)` over the placed models. c = 1 keeps pass 1 of N = 2 exact in
    # float32; a 16-bit S holds the normalised weights' sum (c = w_ref), which no weight exceeds.
    c = w[ref] if compact else 1.0
    perms = [identity_permutation(spec) for _ in range(n)]
    norms = [0.0] * n  # ||M_i||^2 over `keys` (permutations do not change it), from the models
    copy_norms = [0.0] * n  # the same for the copies matched (16-bit ones with `low_memory`)
    units = sum(len(p) for p in perms[ref].values())
    rng = np.random.default_rng(seed)
    others = [i for i in range(n) if i != ref]
    all_others = start in ("all-others", "auto")
    trying = start == "auto"  # pass 1 of "auto", until a model moves
    restarted = False

    total: dict[str, torch.Tensor] = {}  # the running sum S, updated in place from here on
    mean_bits = False  # S is bit for bit the weighted mean the output pass would compute (`ManyResult.mean`)

    def admit(dtypes: Iterable[torch.dtype]) -> None:
        """Widen a 16-bit S to float32 (exactly) when an input holds values it cannot."""
        nonlocal sum_dtype, compact, rounded
        if fixed or not compact or all(_holds(sum_dtype, d) for d in dtypes):
            return
        for key in total:
            total[key] = total[key].to(torch.float32)
        sum_dtype, compact, rounded = torch.float32, False, True

    def narrow_to() -> torch.dtype | None:
        """With `low_memory`, the type the copies matched are held in (that of S), else None."""
        return sum_dtype if low_memory else None

    placed = set(range(n)) if all_others else {ref}
    stale: set[int] = set(others)
    history: list[PassStats] = []
    steps: list[ModelStep] = []
    exact_sum_norm: float | None = None  # ||sum_j w_j pi_j(M_j)||^2 at the current perms, when known
    with worker_pool(threads) as pool:

        def squared_norm(tensors: Mapping[str, torch.Tensor]) -> float:
            return math.fsum(pool.map(lambda t: _dot(t, t), tensors.values()))

        def update(model: Mapping[str, torch.Tensor], factor: float) -> None:
            nonlocal mean_bits
            mean_bits = False
            list(pool.map(lambda key: total[key].add_(model[key], alpha=factor), keys))

        def rebuild() -> float:
            """S recomputed from the models (float32 sums, one rounding); returns its exact norm^2."""
            squares = []
            for key, value in merged_tensors(
                spec, models, perms, weights=w, keys=keys, dtype=torch.float32, threads=threads
            ):
                squares.append(_dot(value, value))
                total[key].copy_(value)
                del value
            return math.fsum(squares)

        def initial_sum() -> float:
            """S over all N models in their own bases (`start="all-others"`): one read of each model,
            summed in float32 key by key and rounded once; fills `norms`; returns `||sum w_j M_j||^2`."""
            dtypes: set[torch.dtype] = set()
            parts: dict[str, tuple[list[float], float]] = {}

            def one_key(key: str) -> None:
                acc, squares = None, []
                for j, model in enumerate(models):
                    value = model[key]
                    dtypes.add(value.dtype)
                    if _is_fp8(value.dtype):  # no mixed-type arithmetic for fp8 in torch
                        value = value.float()
                    squares.append(_dot(value, value))
                    if not math.isfinite(squares[-1]) and not bool(torch.isfinite(value).all()):
                        bad.append((j, key))  # (a huge but finite float32 tensor is no error)
                    if acc is None:
                        acc = value.to(torch.float32, copy=True).mul_(w[j])
                    else:
                        acc.add_(value, alpha=w[j])
                    del value
                assert acc is not None
                scale = c / w[ref]  # S = c * sum u_j M_j = (c / w_ref) * sum w_j M_j
                parts[key] = (squares, _dot(acc, acc))
                total[key] = (acc if scale == 1.0 else acc.mul_(scale)).to(sum_dtype)

            bad: list[tuple[int, str]] = []
            list(pool.map(one_key, keys))
            if bad:  # the first model, then the first key in the spec's order
                order = {key: k for k, key in enumerate(keys)}
                raise NonFinite(*min(bad, key=lambda item: (item[0], order[item[1]])))
            in_order = {key: total[key] for key in keys}  # threads finish keys in any order
            total.clear()
            total.update(in_order)
            for j in range(n):
                norms[j] = math.fsum(parts[key][0][j] for key in keys)
            exact = math.fsum(parts[key][1] for key in keys)
            admit(dtypes)
            return exact

        def from_reference() -> None:
            """S = c * M_ref: the incremental start's sum (also its restart in `start="auto"`)."""
            nonlocal mean_bits
            mean_bits = False
            squares = []
            for key in keys:
                value = models[ref][key]
                admit([value.dtype])
                squares.append(_dot(value, value))
                total[key] = value.to(sum_dtype, copy=True)
                if c != 1.0:
                    total[key].mul_(c)
                del value
            norms[ref] = math.fsum(squares)

        if all_others:
            exact_sum_norm = initial_sum()
            # A 16-bit S holding the normalised weights' sum is each key's float32 weighted sum
            # rounded once: the output pass's tensor for that key, while no model changes it.
            mean_bits = compact and c == w[ref] and not rounded
            if rounded:  # widened to float32 after some keys were rounded: exact once more
                exact_sum_norm = rebuild()
                rounded = False
            return_freed_memory()
        else:
            from_reference()
        copy_norms[ref] = norms[ref]
        # While S holds the all-others pass-start sum and no model has moved, alignments leave S
        # bit for bit as it is, and the identity certificate (certify.py) may answer them.
        pristine = all_others
        centres: list[PassCentre] = []

        def centre() -> PassCentre:
            """The pass's certificate centre (the weighted mean `S * w_ref / c`), built on first use."""
            if not centres:
                centres.append(PassCentre(spec, total, w[ref] / c))
            return centres[0]

        def invalidate_centre() -> None:
            nonlocal pristine
            pristine = False
            if centres:
                centre_seconds[0] += centres[0].seconds
            centres.clear()

        centre_seconds = [0.0]

        converged = [True] * n

        def place(i: int, moved: bool, done: bool) -> None:
            """Book-keeping once model i is at `perms[i]` and counted in S (`moved`: its permutations
            changed; `done`: its matching converged)."""
            nonlocal exact_sum_norm
            # Others' targets change when this model's contribution to S changes: it moved, or (the
            # incremental start) it has just been added; a model of weight 0 contributes nothing.
            if u[i] > 0 and (moved or i not in placed):
                stale.update(placed - {ref, i})
                exact_sum_norm = None
            placed.add(i)
            visited.add(i)
            stale.discard(i)
            if not done:  # stopped at max_iter: its answer may still move from here
                stale.add(i)

        def align(
            i: int, pass_index: int, position: int, visits: int, probe: bool = False
        ) -> tuple[int, float]:
            """Align model i to the mean of the others; returns (permutations changed, distance).
            `probe` (the reference's check in `start="auto"`): the answer is reported, not kept."""
            nonlocal exact_sum_norm
            t0 = time.perf_counter()
            first_visit = i not in visited
            fp8_as = sum_dtype if compact else torch.float16  # exact either way
            weight_others = math.fsum(u[j] for j in placed if j != i)
            factor = 1.0 / (c * weight_others)
            alpha = c * u[i] if i in placed and u[i] > 0 else 0.0
            # auto's pass 1 before a move (n > 2): one sweep decides whether the model moves (a sweep
            # that changes something raises the objective, so no later sweep can bring it back to
            # its own basis), and a model that moves restarts the pass.
            sweeps = 1 if trying and n > 2 and max_iter > 0 else max_iter
            certified = None
            if pristine and first_visit and not full_search and sweeps > 0:

                def read(key: str) -> torch.Tensor:
                    return _load(spec, models[i], [key], None, fp8_as, narrow_to(), None, i, copy=False)[key]

                certified = certified_alignment(
                    spec, total, read, alpha, factor, centre(), pool, precision=precision, device=str(device)
                )
            if certified is not None:  # weight matching's answer, the identity, in one read of the model
                result = certified.result
                copy_norms[i] = certified.model_norm
                mean_norm = certified.target_norm * factor * factor
                new, changed = perms[i], 0
            else:
                exact_norm: list[float] | None = [] if first_visit and low_memory and not all_others else None
                model = _load(
                    spec,
                    models[i],
                    keys,
                    None if first_visit else perms[i],
                    fp8_as,
                    narrow_to(),
                    exact_norm,
                    i,
                )
                if first_visit:
                    if not low_memory:
                        admit({t.dtype for t in model.values()})
                    copy_norms[i] = squared_norm(model)
                    if not all_others:  # (all-others: known from the first sum, before any rounding)
                        norms[i] = math.fsum(exact_norm) if exact_norm is not None else copy_norms[i]
                undo = None
                if pristine and alpha:  # S kept exact if nothing moves (as the certificate keeps it)
                    undo = _subtract_exactly(total, model, alpha, pool)
                elif i in placed and u[i] > 0:
                    update(model, -c * u[i])
                target = _Scaled(total, factor)  # the weighted mean of the others
                mean_norm = squared_norm(total) * factor * factor
                result = weight_matching(
                    spec,
                    target,
                    model,
                    max_iter=sweeps,
                    seed=seed,
                    threads=threads,
                    device=device,
                    precision=precision,
                    warm_start=first_visit,
                    overwrite_model=True,  # `model` is ours: it now holds the newly aligned model
                )
                del target
                new = result.perms if first_visit else compose(perms[i], result.perms)
                changed = sum(not np.array_equal(new[name], perms[i][name]) for name in spec.spaces)
                if undo is not None and changed == 0:
                    _add_back_exactly(total, model, alpha, undo, pool)
                elif u[i] > 0:
                    update(model, c * u[i])
                del model, undo
            moved_units = sum(int(np.count_nonzero(new[name] != perms[i][name])) for name in spec.spaces)
            converged[i] = result.converged
            # A probe keeps nothing: S holds the model as matched (itself if nothing changed, else
            # the pass restarts and S is rebuilt).
            if changed:
                invalidate_centre()
            if not probe:
                perms[i] = new
            if not probe:
                place(i, changed > 0, result.converged)
            # The objective where this alignment starts (a first visit: the model's own basis).
            begin = result.identity_objective if first_visit else result.history[0].objective
            gain = result.objective - begin
            distance = math.sqrt(max(0.0, mean_norm - 2 * result.objective + copy_norms[i]))
            before = math.sqrt(max(0.0, mean_norm - 2 * begin + copy_norms[i]))
            return_freed_memory()
            step = ModelStep(
                pass_index,
                position,
                visits,
                i,
                gain,
                distance,
                changed,
                len(result.history) - 1,
                time.perf_counter() - t0,
                moved_units,
                units,
                before,
                u[i] == 0,
                result.certified,
                result.exact_rows,
                result.searched,
            )
            steps.append(step)
            if on_progress is not None:
                on_progress(step)
            return changed, distance

        visited: set[int] = set()

        def restart() -> None:
            """`start="auto"`: back to the incremental start (every model in its own basis, S the
            reference alone); the alignments already reported stay in `steps`."""
            nonlocal all_others, trying, restarted, exact_sum_norm, rounded
            invalidate_centre()
            all_others, trying, restarted = False, False, True
            for j in range(n):
                perms[j] = identity_permutation(spec)
                converged[j] = True
            placed.clear()
            placed.add(ref)
            visited.clear()
            stale.clear()
            stale.update(others)
            total.clear()
            return_freed_memory()
            from_reference()
            exact_sum_norm, rounded = None, False

        def reuse(i: int, found: Permutations) -> None:
            """Place model i at the converged permutations of its all-others alignment (the same
            target and start as this last incremental alignment: see the module docstring), without
            aligning it."""
            fp8_as = sum_dtype if compact else torch.float16
            model = _load(spec, models[i], keys, found, fp8_as, narrow_to(), None, i)
            update(model, c * u[i])
            del model
            perms[i] = found
            place(i, not _is_identity(found), True)

        for pass_index in range(1, max_passes + 1):
            t_pass = time.perf_counter()
            order = [others[j] for j in rng.permutation(len(others))]
            # Models of weight 0 change no target: aligned only once the others need nothing more.
            weighted = [i for i in order if i in stale and u[i] > 0]
            zero = [i for i in order if i in stale and u[i] == 0]
            distances: list[float] = []
            models_changed = perms_changed = 0
            sweeps_before = sum(s.sweeps for s in steps)
            check = trying and n > 2  # auto: the reference's check once no weighted model moved
            planned = len(weighted) + len(zero) + check
            position = 0
            queue, k = list(weighted), 0
            kept: tuple[int, Permutations, bool] | None = None  # auto: (mover, its answer, converged)
            moved_since_restart = False
            while k < len(queue) or check:
                if k == len(queue):  # every weighted model of an auto pass 1 unmoved: the reference's check
                    check = False
                    position += 1
                    changed, distance = align(ref, pass_index, position, planned, probe=True)
                    distances.append(distance)
                    if changed:  # the reference is in another basis than the rest: incremental
                        restart()
                        position, planned = 0, len(queue) + len(zero)
                        k = 0
                    continue
                i = queue[k]
                k += 1
                if kept is not None and i == kept[0] and not moved_since_restart:
                    _, found, done = kept
                    if done:
                        reuse(i, found)
                        continue
                    # Its one-sweep answer had not converged: the alignment goes on from there
                    # (same target, the model at that answer) instead of starting again.
                    perms[i] = found
                    visited.add(i)
                position += 1
                changed, distance = align(i, pass_index, position, planned)
                distances.append(distance)
                models_changed += changed > 0
                perms_changed += changed
                moved_since_restart = moved_since_restart or changed > 0
                if trying and changed:  # the inputs do not share one basis: restart incrementally
                    kept = (i, perms[i], converged[i])
                    queue = [j for j in queue[: k - 1]] + queue[k:] + [i]
                    restart()
                    position, planned, k, moved_since_restart = 0, len(queue) + len(zero), 0, False
                    check = False
            trying = False
            if not any(u[i] > 0 for i in stale):
                for i in zero:
                    position += 1
                    changed, distance = align(i, pass_index, position, planned)
                    distances.append(distance)
                    models_changed += changed > 0
                    perms_changed += changed
            sweeps = sum(s.sweeps for s in steps) - sweeps_before
            invalidate_centre()  # S may be rebuilt below, and only pass 1 starts from the all-others sum
            rebuild_seconds = 0.0
            if not compact and not rounded:  # S = c * sum u_i pi_i(M_i) = (c / w_ref) sum w_i pi_i(M_i)
                exact_sum_norm = squared_norm(total) * (w[ref] / c) ** 2
            elif exact_sum_norm is None or rounded:  # S rebuilt exactly (its 16-bit updates rounded)
                rounded = False
                if on_progress is not None:
                    on_progress(SumRebuild(pass_index, n))
                t0 = time.perf_counter()
                exact_sum_norm = rebuild()
                return_freed_memory()
                rebuild_seconds = time.perf_counter() - t0
            objective = (exact_sum_norm - math.fsum(wi * wi * ni for wi, ni in zip(w, norms))) / 2
            last = not stale or (models_changed == 0 and max_iter == 0) or pass_index == max_passes
            stats = PassStats(
                pass_index,
                objective,
                math.fsum(distances) / len(distances) if distances else 0.0,
                len(distances),
                models_changed,
                perms_changed,
                sweeps,
                time.perf_counter() - t_pass,
                rebuild_seconds,
                all(_is_identity(p) for p in perms),
                last,
                centre_seconds[0],
            )
            centre_seconds[0] = 0.0
            history.append(stats)
            if on_progress is not None:
                on_progress(stats)
            if last:  # converged, or --iters 0 (nothing can move), or max_passes
                break
    mean = {key: total[key] for key in keys} if mean_bits and all(_is_identity(p) for p in perms) else None
    total.clear()
    return_freed_memory()
    return ManyResult(perms, history, not stale, w, ref, sum_dtype, steps, start, low_memory, restarted, mean)


def merged_tensors(
    spec: PermutationSpec,
    models: Sequence[Mapping[str, torch.Tensor]],
    perms: Sequence[Permutations],
    *,
    weights: Sequence[float] | None = None,
    keys: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    threads: int | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(key, sum_i w_i pi_i(M_i)[key])`, the weighted mean of the aligned models, key by key.

    The output pass of MergeMany: each key is read from every model, permuted, and summed in
    float32; keys run in parallel on `threads` with a bounded number in flight, so memory is a few
    keys' worth beyond what the caller keeps. `keys` default to the first model's floating-point
    keys; every model must have them. `dtype` is the output dtype (default: the first model's
    dtype of that key). `weights` as in `merge_many` (normalised here). Keys the spec does not
    bind are averaged as they are.
    """
    w = _normalised(weights, len(models))
    if len(perms) != len(models):
        raise ValueError(f"got {len(perms)} permutations for {len(models)} models")
    if keys is None:
        keys = [k for k, v in models[0].items() if v.is_floating_point()]
    keys = list(keys)
    threads = threads or default_threads()

    def mean_of(key: str) -> torch.Tensor:
        acc: torch.Tensor | None = None
        out_dtype = dtype
        for model, p, wi in zip(models, perms, w):
            value = model[key]
            out_dtype = out_dtype or value.dtype
            value = permute_tensor(spec, key, value, p)
            if _is_fp8(value.dtype):  # no mixed-type arithmetic for fp8 in torch
                value = value.float()
            if acc is None:
                acc = value.to(torch.float32, copy=True).mul_(wi)
            else:
                acc.add_(value, alpha=wi)
            del value
        assert acc is not None
        return acc if out_dtype == torch.float32 else acc.to(out_dtype)

    in_flight = max(2, 2 * threads)
    with worker_pool(threads) as pool:
        futures = []
        for key in keys:
            futures.append((key, pool.submit(mean_of, key)))
            if len(futures) >= in_flight:
                done_key, future = futures.pop(0)
                yield done_key, future.result()
        for done_key, future in futures:
            yield done_key, future.result()
