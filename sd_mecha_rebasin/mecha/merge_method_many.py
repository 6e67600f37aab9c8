"""`git_rebasin_many`: MergeMany (Git Re-Basin, Algorithm 3) as an n-ary sd-mecha merge method.

    sd_mecha_rebasin.rebasin_many(M1, M2, ..., MN, weights="", ref=0, member=-1, ...)

With `member=-1` (default) each output key is the weighted mean of the N models re-based into the
reference's basis, `sum_i w_i pi_i(M_i)[key]`. With `member=i` it is model i alone, re-based
(`pi_i(M_i)[key]`): a recipe node to chain, e.g. TIES over the re-based task vectors against a base.

The permutations depend on the whole models, so the first call runs one pre-pass
(`many.merge_many`, the same loop as `sd-rebasin merge-many`) while the other worker threads
wait; it reads the bound keys through sd-mecha's state-dict views without their per-key limit (as
`git_rebasin` does, see `merge_method.py`), one model at a time, so its memory does not grow with N;
each model's result goes to `events` listeners ("many_model", "many_pass") as soon as it is known.
The permutations (not the tensors) are memoised in this process per inputs (recipe text, and each
file's size and mtime) and settings: the N `member=i` nodes of one recipe share one pre-pass. Keys the rules do not bind (VAE, buffers) are
averaged (`member=-1`) or taken from model i; integer tensors come from the reference.
"""

# No `from __future__ import annotations`: sd-mecha evaluates the Parameter annotations at runtime.
import collections
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sd_mecha import Parameter, Return, StateDict, merge_method
from torch import Tensor

from ..architectures import permutation_spec
from ..common.memory import return_freed_memory
from ..files import key_kinds
from ..files.checkpoint import merge_policy
from ..permutations.spec import Permutations, PermutationSpec, permute_tensor
from ..search.many import STARTS, check_weights, emit_progress, merge_many
from .merge_method import _arch_lock, _arch_overrides, _compact, _read, _unlimited, bound_keys, ema_targets

IDENTIFIER = "git_rebasin_many"

MEMO_SIZE = 8
"""Pre-pass results (permutations only, a few MB each) kept per process."""

_memo: "collections.OrderedDict[tuple, tuple[PermutationSpec, list[Permutations]]]" = (
    collections.OrderedDict()
)
_memo_locks: dict[tuple, threading.Lock] = {}
_memo_lock = threading.Lock()


def parse_weights(text: str, n: int, ref: int) -> list[float]:
    """`"w1,...,wN"` (empty: equal) -> weights normalised to sum 1; ValueError when bad."""
    text = text.strip()
    try:
        weights = [float(part) for part in text.split(",")] if text else None
    except ValueError:
        raise ValueError(
            f"git_rebasin_many: weights {text!r} is not a comma-separated list of numbers"
        ) from None
    try:
        return check_weights(weights, n, ref)
    except ValueError as e:
        raise ValueError(f"git_rebasin_many: {e}") from None


class _FreshReads(Mapping[str, Tensor]):
    """One model's bound keys read from sd-mecha on access, as compact private copies."""

    fresh_tensors = True

    def __init__(self, state_dict: Mapping[str, Tensor], keys: Sequence[str]):
        self.state_dict = state_dict
        self.keys_ = list(keys)
        self._present: set[str] | None = None

    def __getitem__(self, key: str) -> Tensor:
        value = _read(self.state_dict, key)
        if value is None:
            raise KeyError(key)
        return _compact(value, private=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)

    def __contains__(self, key: object) -> bool:
        return key in self.keys_


def _files_of(node: Any, out: list[str]) -> None:
    """Path, size and mtime of every model file under a recipe node (a changed file misses the memo)."""
    path = getattr(node, "path", None)
    if path is not None:
        try:
            stat = os.stat(path)
            out.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
        except (OSError, TypeError):
            out.append(str(path))
    for child in getattr(getattr(node, "bound_args", None), "arguments", {}).values():
        for item in child if isinstance(child, (tuple, list)) else (child,):
            _files_of(item, out)


def _node_identity(state_dict: Any) -> str:
    """The recipe text of the node behind an sd-mecha state-dict view and the state of its files."""
    node = getattr(state_dict, "node", None)
    if node is None:
        return f"id:{id(state_dict)}"
    try:
        import sd_mecha

        files: list[str] = []
        _files_of(node, files)
        return sd_mecha.serialize(node, finalize=False) + "\n" + "\n".join(files)
    except Exception:  # noqa: BLE001 - fall back to the object's identity
        return f"id:{id(node)}"


def _shapes(
    models: Sequence[Mapping[str, Tensor]], ref: int, keys: Sequence[str]
) -> dict[str, tuple[int, ...]]:
    """Shapes of the reference's bound keys (read one at a time); ValueError when a model differs."""
    shapes = {}
    for key in keys:
        value = _read(models[ref], key)
        if value is not None:
            shapes[key] = tuple(value.shape)
    if len(shapes) < len(keys) / 2:
        raise ValueError(
            f"git_rebasin_many: the reference has only {len(shapes)} of the {len(keys)} bound keys"
        )
    return shapes


def _text_encoders(
    models: Sequence[Mapping[str, Tensor]], config: str, keys: Sequence[str]
) -> tuple[str, ...]:
    """The text encoders every model has (all or none, see `present_text_encoders`): probed by one
    small key each, so that a UNet-only model among them leaves the encoders out of the matching."""
    from ..architectures import family_facts, present_text_encoders

    if not present_text_encoders(config, dict.fromkeys(keys)):
        return ()
    for enc in family_facts(config)["text_encoders"].values():
        under = [k for k in keys if k.startswith(enc["prefix"])]
        probe = next((k for k in under if k.endswith(".bias")), under[0] if under else None)
        if probe is None or any(_read(m, probe) is None for m in models):
            return ()
    return present_text_encoders(config, dict.fromkeys(keys))


def _prepass(
    models: Sequence[StateDict[Tensor]], config: str, settings: tuple, arch: Any
) -> tuple[PermutationSpec, list[Permutations]]:
    weights, ref, max_passes, iters, seed, threads, device, precision, start, low_memory, full_search = (
        settings
    )
    views = [_unlimited(m) for m in models]
    keys = [key for key in models[ref].model_config.keys() if key in bound_keys(config)]
    shapes = _shapes(views, ref, keys)
    try:
        spec = permutation_spec(
            config, arch=arch, shapes=shapes, text_encoders=_text_encoders(views, config, keys)
        )
    except ValueError as e:
        raise ValueError(
            f"git_rebasin_many: the tensor shapes do not fit the {config} architecture: {e}"
        ) from e
    lazy = [_FreshReads(v, list(shapes)) for v in views]
    result = merge_many(
        spec,
        lazy,
        weights=weights,
        ref=ref,
        max_passes=max_passes,
        max_iter=iters,
        seed=seed,
        threads=threads or None,
        device=device,
        precision=precision,
        start=start,
        low_memory=low_memory,
        full_search=full_search,
        on_progress=emit_progress,  # each model's result to `events` listeners as it is known
    )
    return_freed_memory()
    return spec, result.perms


@merge_method(identifier=IDENTIFIER)
class rebasin_many:
    """MergeMany: the weighted mean of N models re-based into the reference's basis (or one of them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._alignment: tuple[PermutationSpec, list[Permutations]] | None = None
        self._error: BaseException | None = None

    def __call__(
        self,
        *models: Parameter(StateDict[Tensor]),
        weights: Parameter(str) = "",
        ref: Parameter(int) = 0,
        member: Parameter(int) = -1,
        max_passes: Parameter(int) = 100,
        iters: Parameter(int) = 100,
        seed: Parameter(int) = 0,
        threads: Parameter(int) = 0,
        device: Parameter(str) = "cpu",
        precision: Parameter(str) = "fp32",
        start: Parameter(str) = "auto",
        low_memory: Parameter(bool) = False,
        full_search: Parameter(bool) = False,
        **kwargs,
    ) -> Return(Tensor):
        """
        :param models: the N models (N >= 2), all of one family.
        :param weights: "w1,...,wN" (normalised to sum 1; empty: equal), used for the means models align to and the output.
        :param ref: index of the model whose basis the output lives in; it is never permuted.
        :param member: -1: the weighted mean; i: model i alone, re-based (for chaining).
        :param max_passes: the most MergeMany passes (stops earlier when a pass moves no model).
        :param iters: the most weight-matching sweeps per alignment.
        :param seed: seeds the visiting order of the models and of the permutations.
        :param threads: threads for the pre-pass; 0 picks one per CPU.
        :param device: torch device for the pre-pass products.
        :param precision: "fp32" (exact products) or "bf16".
        :param start: the first pass: "auto" (default: all-others until a model moves, then incremental; models sharing a basis stop after one pass of N alignments, permuted ones recover as with incremental), "incremental" (each model aligned to the mean of those placed before it) or "all-others" (the paper's: to the mean of all the others in their own bases; models sharing a basis stop after N - 1 alignments, models in unrelated bases end in a worse optimum).
        :param low_memory: match on float16 copies of the running sum and of the model being aligned (the output is still summed in float32).
        :param full_search: run weight matching's products for every alignment (by default the first pass proves "nothing moves" without them where it can; the same answer).
        """
        key = kwargs["key"]
        n = len(models)
        w = parse_weights(weights, n, ref)
        if not -1 <= member < n:
            raise ValueError(
                f"git_rebasin_many: member {member} is out of range for {n} models (-1: the mean)"
            )
        if start not in STARTS:
            raise ValueError(f"git_rebasin_many: start {start!r} is not one of {', '.join(STARTS)}")
        config = models[ref].model_config.identifier
        bound = ema_targets(config).get(key, key)
        sources = range(n) if member < 0 else [member]
        if bound in bound_keys(config):
            settings = (
                tuple(w),
                ref,
                max_passes,
                iters,
                seed,
                threads,
                device,
                precision,
                start,
                low_memory,
                full_search,
            )
            spec, perms = self._align_once(models, config, settings)
            values = [(i, permute_tensor(spec, bound, models[i][key], perms[i])) for i in sources]
        else:
            values = [(i, models[i][key]) for i in sources]
        if member >= 0:
            return values[0][1]
        if not values[0][1].is_floating_point() or merge_policy(config, key) not in (None, key_kinds.MERGED):
            return models[ref][key]  # integer buffers, and what `key_kinds` keeps from the reference
        total = None
        for i, value in values:
            total = value * w[i] if total is None else total.add_(value, alpha=w[i])
        return total

    def _align_once(
        self, models: Sequence[StateDict[Tensor]], config: str, settings: tuple
    ) -> tuple[PermutationSpec, list[Permutations]]:
        with self._lock:
            if self._alignment is not None:
                return self._alignment
            if self._error is not None:
                raise self._error
            with _arch_lock:
                arch = _arch_overrides.get(config)
            memo_key = (tuple(_node_identity(m) for m in models), settings, config, repr(arch))
            with _memo_lock:
                lock = _memo_locks.setdefault(memo_key, threading.Lock())
            try:
                with lock:  # other nodes of the same inputs (member=i) wait here for one pre-pass
                    with _memo_lock:
                        found = _memo.get(memo_key)
                    if found is None:
                        found = _prepass(models, config, settings, arch)
                        with _memo_lock:
                            _memo[memo_key] = found
                            while len(_memo) > MEMO_SIZE:
                                _memo.popitem(last=False)
            except BaseException as e:
                self._error = e
                raise
            self._alignment = found
            return found


def forget_prepasses() -> None:
    """Drop the memoised permutations (e.g. after input files changed on disk)."""
    with _memo_lock:
        _memo.clear()
        _memo_locks.clear()
