"""MergeMany (Git Re-Basin, Algorithm 3): N models brought into one basis and averaged.

Ainsworth, Hayase, Srinivasa, "Git Re-Basin" (ICLR 2023), Algorithm 3 and its code
(`mnist_mlp_wm_many.py`): repeat passes; in each pass visit the models in a seeded random order and
align model i by weight matching (Algorithm 1, `matching.weight_matching`) to the weighted mean of
the other N - 1 models in their current bases; stop when a pass moves no model; the result is the
weighted mean of the aligned models.

What this implementation adds to the paper's loop, and why:

- **Reference.** The objective is unchanged when one permutation is applied to all N models, so
  one model (the reference) stays at the identity and is never re-aligned: the output lives in its
  basis (LoRAs, ControlNets and embeddings made for the reference's base keep working).
- **Memory that does not grow with N.** Only a running weighted sum `S` of the aligned models
  (float32, the keys the spec permutes) and the one model being aligned are held; models are read
  from their (lazy) mappings when visited. Model i is matched against `S - w_i pi_i(M_i)`, scaled
  in place to the mean of the others (weight matching's argmax does not change with the scale of
  the target, but its invariant-feature start does), and added back after.
- **First pass.** The paper starts every model in its own basis, so the first models are matched
  to a mean of unrelated bases. Here the first pass is incremental: the sum starts as the
  reference, and each model visited is aligned to the mean of the models already placed. For
  N = 2 this is exactly the pair merge (model 1 aligned to the reference).
- **Skipping.** A model is re-aligned only if another model moved since its last alignment
  (otherwise its target and starting point are the same, so is the answer); a pass in which no
  model is re-aligned or none moves ends the loop.

`merged_tensors` is the output pass: the weighted mean of the aligned models, key by key, read from
the inputs (the running sum is not used: it has been updated in place many times).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .matching import _accurate_sum, default_threads, weight_matching
from .memory import return_freed_memory
from .spec import Permutations, PermutationSpec, identity_permutation, permute_tensor

DEFAULT_MAX_PASSES = 100
"""The paper's code stops at 100 passes at the latest."""


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
    """Rise of `<mean of the others, pi_i(M_i)>` from the start of this alignment (>= 0)."""
    distance: float
    """`||mean of the others - pi_i(M_i)||` after the alignment (L2 over the spec's keys)."""
    changed: int
    """Permutations of this model that changed."""
    sweeps: int
    seconds: float


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

    @property
    def passes(self) -> int:
        return len(self.history)


def _normalised(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} models")
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight {i + 1} is {w}: weights must be finite and >= 0")
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
    spec: PermutationSpec, model: Mapping[str, torch.Tensor], keys: Iterable[str], perms: Permutations | None
) -> dict[str, torch.Tensor]:
    """The model's `keys`, as tensors of our own, permuted by `perms` when given."""
    fresh = bool(getattr(model, "fresh_tensors", False))
    out = {}
    for key in keys:
        value = model[key]
        if perms is not None:
            permuted = permute_tensor(spec, key, value, perms)
            fresh = fresh or permuted is not value
            value = permuted
        out[key] = value if fresh else value.clone()
    return out


def _dot(a: torch.Tensor, b: torch.Tensor, rows: int = 1 << 22) -> float:
    """`<a, b>` in float32 slices summed in float64 (no full-size float32 temporary)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return math.fsum(
        _accurate_sum(a[lo : lo + rows].float() * b[lo : lo + rows].float())
        for lo in range(0, a.numel(), rows)
    )


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
    on_progress: Callable[[ModelStep | PassStats], None] | None = None,
) -> ManyResult:
    """MergeMany: the permutations that bring N models into the reference's basis (Git Re-Basin, Alg. 3).

    `models` are state dicts in the checkpoint layout the spec was built for: plain dicts, or lazy
    mappings that read a tensor from a file when asked (`lazy.FileStateDict`); each is read once
    per alignment, and never changed. Memory: one float32 running sum over the spec's keys present
    in the reference plus one model being aligned, whatever N. Every model must have those keys.
    `weights` (default equal; normalised) weigh both the mean each model is aligned to and the
    output (`merged_tensors`). `max_iter`, `seed`, `threads`, `device`, `precision` go to
    `weight_matching`; the result is the same for any thread count. `on_progress` receives a
    `ModelStep` after each alignment and a `PassStats` after each pass.

    Raises ValueError for fewer than 2 models, bad weights (see `check_weights`), a bad `ref`, or a
    model that lacks one of the reference's permuted keys.
    """
    n = len(models)
    w = check_weights(weights, n, ref)
    if max_passes < 1:
        raise ValueError(f"max_passes must be >= 1, got {max_passes}")
    threads = threads or default_threads()
    keys = [key for key in spec.axes if key in models[ref]]
    for i, model in enumerate(models):
        missing = next((key for key in keys if key not in model), None)
        if missing is not None:
            raise ValueError(f"model {i + 1} lacks {missing}, which the reference (model {ref + 1}) has")
    u = [x / w[ref] for x in w]  # internal weights: the reference's is 1, so pass 1 of N = 2 is the pair
    perms = [identity_permutation(spec) for _ in range(n)]
    norms = [0.0] * n  # ||M_i||^2 over `keys` (permutations do not change it)
    rng = np.random.default_rng(seed)
    others = [i for i in range(n) if i != ref]

    total: dict[str, torch.Tensor] = {}  # the running sum S, updated in place from here on
    for key in keys:
        value = models[ref][key]
        norms[ref] += _dot(value, value)
        total[key] = value.to(torch.float32, copy=True)
    placed = {ref}
    stale: set[int] = set(others)
    history: list[PassStats] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:

        def scale(factor: float) -> None:
            if factor != 1.0:
                list(pool.map(lambda t: t.mul_(factor), total.values()))

        def squared_norm(tensors: Mapping[str, torch.Tensor]) -> float:
            return math.fsum(pool.map(lambda t: _dot(t, t), tensors.values()))

        def update(model: Mapping[str, torch.Tensor], factor: float) -> None:
            list(pool.map(lambda key: total[key].add_(model[key], alpha=factor), keys))

        for pass_index in range(1, max_passes + 1):
            t_pass = time.perf_counter()
            order = [others[j] for j in rng.permutation(len(others))]
            visits = [i for i in order if i in stale]
            distances: list[float] = []
            models_changed = perms_changed = sweeps = 0
            for position, i in enumerate(visits, 1):
                t0 = time.perf_counter()
                first_visit = i not in placed
                model = _load(spec, models[i], keys, None if first_visit else perms[i])
                if first_visit:
                    norms[i] = squared_norm(model)
                else:
                    update(model, -u[i])
                weight_others = math.fsum(u[j] for j in placed if j != i)
                scale(1.0 / weight_others)  # S now holds the weighted mean of the others
                mean_norm = squared_norm(total)
                result = weight_matching(
                    spec,
                    total,
                    model,
                    max_iter=max_iter,
                    seed=seed,
                    threads=threads,
                    device=device,
                    precision=precision,
                    warm_start=first_visit,
                    overwrite_model=True,  # `model` is ours: it now holds the newly aligned model
                )
                scale(weight_others)
                update(model, u[i])
                del model
                new = result.perms if first_visit else compose(perms[i], result.perms)
                changed = sum(not np.array_equal(new[name], perms[i][name]) for name in spec.spaces)
                perms[i] = new
                if changed or first_visit:
                    stale |= placed - {ref, i}
                placed.add(i)
                stale.discard(i)
                if not result.converged:  # stopped at max_iter: its answer may still move from here
                    stale.add(i)
                gain = max(0.0, result.objective - result.history[0].objective)
                distance = math.sqrt(max(0.0, mean_norm - 2 * result.objective + norms[i]))
                distances.append(distance)
                models_changed += changed > 0
                perms_changed += changed
                sweeps += len(result.history) - 1
                return_freed_memory()
                if on_progress is not None:
                    on_progress(
                        ModelStep(
                            pass_index,
                            position,
                            len(visits),
                            i,
                            gain,
                            distance,
                            changed,
                            len(result.history) - 1,
                            time.perf_counter() - t0,
                        )
                    )
            scale_back = w[ref] ** 2  # S holds sum u_i pi_i(M_i) = (sum w_i pi_i(M_i)) / w_ref
            sum_norm = squared_norm(total) * scale_back
            objective = (sum_norm - math.fsum(wi * wi * ni for wi, ni in zip(w, norms))) / 2
            stats = PassStats(
                pass_index,
                objective,
                math.fsum(distances) / len(distances) if distances else 0.0,
                len(visits),
                models_changed,
                perms_changed,
                sweeps,
                time.perf_counter() - t_pass,
            )
            history.append(stats)
            if on_progress is not None:
                on_progress(stats)
            if not stale:
                break
    total.clear()
    return_freed_memory()
    return ManyResult(perms, history, not stale, w, ref)


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
            if acc is None:
                acc = value.to(torch.float32, copy=True).mul_(wi)
            else:
                acc.add_(value, alpha=wi)
            del value
        assert acc is not None
        return acc if out_dtype == torch.float32 else acc.to(out_dtype)

    in_flight = max(2, 2 * threads)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = []
        for key in keys:
            futures.append((key, pool.submit(mean_of, key)))
            if len(futures) >= in_flight:
                done_key, future = futures.pop(0)
                yield done_key, future.result()
        for done_key, future in futures:
            yield done_key, future.result()
