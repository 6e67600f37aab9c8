"""`git_rebasin`: exact Git Re-Basin as an sd-mecha merge method (`sd_mecha_rebasin.rebasin`).

sd-mecha merges key by key, but the permutations depend on the whole model. So the first call
(whatever its key) runs a pre-pass: it reads every key the permutation rules bind from `a` and
`ref`, checks that both models have the same shapes, and runs weight matching; other worker threads
wait on a lock meanwhile. Matching leaves the pre-pass's copy of `a` permuted, so each call then
hands out its own key from that copy (and drops it) instead of reading `a` again: one read and one
gather per key saved, and the copy shrinks as the output grows. Keys the pre-pass did not hold (EMA
copies, permutations from a cache) are read from `a` and permuted as sd-mecha streams them. The
pre-pass state lives on the method instance that sd-mecha creates for each recipe node in each
merge, so nothing outlives the merge; `ref`'s copy is dropped as soon as the permutations are known.

Key declaration: `map_keys` declares each key's own inputs (`a[key]`, plus `ref[key]` for bound
keys so that sd-mecha evaluates `ref` at all), and the pre-pass reads the other keys through a copy
of sd-mecha's state-dict view without its per-key limit. Declaring every bound key as an input of
every bound key is what sd-mecha's contract asks for, but it costs O(keys^2) in sd-mecha's own
bookkeeping (port sets, and a release walk over every declared input after every output key):
119 s instead of 3.5 s for an SD1 merge of placeholder tensors, some 13 min for SDXL (extrapolated).
Declaring the whole model on a single key instead would make the other keys wait for that one,
which deadlocks whenever sd-mecha reaches another key first (threads=0, or the key missing).
"""

# No `from __future__ import annotations`: sd-mecha evaluates the Parameter annotations at runtime.
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from sd_mecha import Parameter, Return, StateDict, StateDictKeyError, merge_method
from torch import Tensor

from ..architectures import config_shapes, permutation_spec, present_text_encoders
from ..common import events
from ..common.memory import return_freed_memory
from ..common.sd_mecha_compat import KeyMapBuilder, key_map_output_config, key_map_params, unlimited_view
from ..common.workers import worker_pool
from ..files.variants import match_input_conv
from ..permutations.spec import Permutations, PermutationSpec, permute_tensor
from ..search.matching import PRECISIONS, MatchResult, SweepStats, default_threads, weight_matching

IDENTIFIER = "git_rebasin"
"""sd-mecha 1.1.x already owns `rebasin` (its builtin SDXL-only interface)."""

logger = logging.getLogger(__name__)

_arch_overrides: dict[str, Mapping[str, Mapping[str, Any]]] = {}
_arch_lock = threading.Lock()


@contextlib.contextmanager
def arch_override(config: str, arch: Mapping[str, Mapping[str, Any]]) -> Iterator[None]:
    """Use other architecture facts for `config` in merges started inside the block.

    For tests: tiny models keep the real key names but have other head and GroupNorm group counts,
    which shapes do not reveal (see `permutation_spec`'s `arch`). Real checkpoints never need it.
    """
    with _arch_lock:
        previous = _arch_overrides.get(config)
        _arch_overrides[config] = arch
    try:
        yield
    finally:
        with _arch_lock:
            if previous is None:
                _arch_overrides.pop(config, None)
            else:
                _arch_overrides[config] = previous


@functools.cache
def bound_keys(config: str) -> frozenset[str]:
    """Keys of `config` that the permutation rules bind (the same names at any size)."""
    return frozenset(permutation_spec(config).axes)


@functools.cache
def ema_targets(config: str) -> dict[str, str]:
    """EMA copies of bound UNet keys (`model_ema.<name without dots>`, SD1/SD2) -> the key they copy.

    They are permuted like the key they copy, so that the EMA weights stay a model of the same
    function as the permuted UNet (and average with `ref`'s EMA weights unit by unit).
    """
    flat = {
        key[len("model.") :].replace(".", ""): key for key in bound_keys(config) if key.startswith("model.")
    }
    prefix = "model_ema."
    return {
        k: flat[k[len(prefix) :]]
        for k in config_shapes(config)
        if k.startswith(prefix) and k[len(prefix) :] in flat
    }


@dataclasses.dataclass(frozen=True)
class Settings:
    iters: int
    seed: int
    threads: int
    device: str
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise ValueError(f"git_rebasin: iters must be >= 0, got {self.iters}")
        if self.threads < 0:
            raise ValueError(f"git_rebasin: threads must be >= 0 (0: one per CPU), got {self.threads}")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"git_rebasin: device {self.device!r} is not a torch device") from e
        if self.precision not in PRECISIONS:
            raise ValueError(f"git_rebasin: precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclasses.dataclass(frozen=True)
class Alignment:
    """What the output phase needs: the spec (with the models' real shapes) and the permutations."""

    spec: PermutationSpec
    perms: Permutations
    result: MatchResult


def _unlimited(state_dict: StateDict[Tensor]) -> StateDict[Tensor]:
    """`state_dict` without sd-mecha's per-key read limit (see the module docstring and
    `sd_mecha_compat.unlimited_view`, where the versions differ)."""
    return unlimited_view(state_dict)


COMPACT_CHUNK = 1 << 20
"""Elements converted at a time by `_compact`: the round-trip check then stays in the CPU cache."""


def _compact(tensor: Tensor, private: bool = True) -> Tensor:
    """A CPU copy in the narrowest float dtype that holds every value exactly.

    sd-mecha upcasts inputs to its merge dtype (fp32 by default); an fp16 checkpoint comes back to
    fp16 here, so the pre-pass holds two models at their stored size, not twice that. Converted in
    cache-sized chunks, each checked by converting it back. `private`: the result may be changed
    in place, so it is never sd-mecha's own tensor (matching permutes `a`'s copy in place).
    """
    tensor = tensor.detach().to("cpu")
    if not tensor.is_floating_point() or tensor.element_size() <= 2:
        return tensor.clone() if private else tensor
    flat = tensor.reshape(-1)
    for dtype in (torch.float16, torch.bfloat16):
        narrow = torch.empty(flat.shape, dtype=dtype)
        for lo in range(0, flat.numel(), COMPACT_CHUNK):
            part = narrow[lo : lo + COMPACT_CHUNK]
            part.copy_(flat[lo : lo + COMPACT_CHUNK])
            if not torch.equal(part.to(tensor.dtype), flat[lo : lo + COMPACT_CHUNK]):
                break
        else:
            return narrow.view(tensor.shape)
    return tensor.clone() if private else tensor


def _sweep_done(stats: SweepStats) -> None:
    events.emit("sweep", stats=stats)
    return_freed_memory()  # each sweep churns through temporaries of every size


def _read(state_dict: Mapping[str, Tensor], key: str) -> Tensor | None:
    try:
        return state_dict[key]
    except StateDictKeyError:  # absent (e.g. an optional key), or non-finite and omitted
        return None


TRIM_EVERY_KEYS = 32
"""While reading, freed heap pages go back to the OS this often: sd-mecha's float32 reads, freed
between the compact copies that stay, otherwise left ~3 GB of holes by the end of an SDXL read
(read-phase peak 16.6 -> 13.4 GiB). The same while the aligned copy of `a` is handed out: its
tensors are freed one by one into the heaps of the threads that read them."""


@dataclasses.dataclass
class HeldTensor:
    """A compact copy of an input key and how sd-mecha handed it over (its merge dtype and device)."""

    value: Tensor
    dtype: torch.dtype
    device: torch.device

    def restored(self) -> Tensor:
        """The value as sd-mecha would hand it over (exact: the copy is lossless)."""
        return self.value.to(device=self.device, dtype=self.dtype)


def _hold(value: Tensor | None, private: bool) -> HeldTensor | None:
    return None if value is None else HeldTensor(_compact(value, private), value.dtype, value.device)


def read_models(
    config: str, a: Mapping[str, Tensor], ref: Mapping[str, Tensor], keys: list[str], threads: int
) -> tuple[dict[str, HeldTensor], dict[str, HeldTensor]]:
    """Compact copies of `keys` from both models, read by `threads` workers (sd-mecha evaluates
    each key of a recipe node on demand, and upcasts it: both parallelise). The first shape
    mismatch in `keys`' order is the error. Emits the "read" phase's events (see `events.py`)."""

    def read_pair(key: str) -> tuple[HeldTensor | None, HeldTensor | None]:
        a_value, ref_value = _read(a, key), _read(ref, key)
        if a_value is not None and ref_value is not None:
            ref_value = match_input_conv(key, a_value, ref_value)  # inpainting vs plain: latents only
        if a_value is not None and ref_value is not None and a_value.shape != ref_value.shape:
            raise ValueError(
                f"git_rebasin: {key} has shape {tuple(a_value.shape)} in `a` but {tuple(ref_value.shape)} "
                f"in `ref` (both read as {config}); re-basin needs two models of the same architecture"
            )
        return _hold(a_value, private=True), _hold(ref_value, private=False)  # only `a` is permuted

    a_out: dict[str, HeldTensor] = {}
    ref_out: dict[str, HeldTensor] = {}
    held = 0
    events.emit("phase_start", phase="read", total=len(keys), unit="key")
    with worker_pool(threads) as pool:
        for done, (key, (a_value, ref_value)) in enumerate(zip(keys, pool.map(read_pair, keys)), 1):
            if done % TRIM_EVERY_KEYS == 0:  # the freed float32 reads otherwise fragment the heap
                return_freed_memory()
            if a_value is not None:
                a_out[key] = a_value
                held += a_value.value.nbytes
            if ref_value is not None:
                ref_out[key] = ref_value
                held += ref_value.value.nbytes
            events.emit("phase", phase="read", done=done, bytes=held)
    events.emit("phase_end", phase="read")
    return a_out, ref_out


def align(
    config: str,
    a: StateDict[Tensor],
    ref: StateDict[Tensor],
    settings: Settings,
    arch: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Alignment, dict[str, HeldTensor]]:
    """The pre-pass: read both models, derive the spec from their shapes, run weight matching.

    Returns the permutations and the pre-pass's copy of `a`, permuted by them. Keys missing from
    one model are left out of the matching; the permutations stay legal, and a key of `a` is
    permuted whether or not `ref` has it. Where either model lacks the text encoders (a UNet-only
    model), only the UNet is permuted.
    """
    keys = [key for key in a.model_config.keys() if key in bound_keys(config)]  # config order
    a_held, ref_held = read_models(config, a, ref, keys, settings.threads or default_threads())
    return_freed_memory()
    a_values = {key: held.value for key, held in a_held.items()}
    ref_values = {key: held.value for key, held in ref_held.items()}
    del ref_held  # `ref_values` holds the only reference: gone when matching returns
    for name, values in (("a", a_values), ("ref", ref_values)):
        if len(values) < len(keys) / 2:
            raise ValueError(
                f"git_rebasin: `{name}` has only {len(values)} of the {len(keys)} keys that the {config} "
                f"permutation rules bind; is it a {config} model?"
            )
    shapes = {key: tuple(value.shape) for key, value in (ref_values | a_values).items()}
    # A text encoder takes part only if both models have it: with a UNet-only model, permuting
    # its stream would leave the cross-attention of that model reading an unpermuted encoder.
    encoders = present_text_encoders(config, a_values, ref_values)
    try:
        spec = permutation_spec(config, arch=arch, shapes=shapes, text_encoders=encoders)
    except ValueError as e:
        raise ValueError(f"git_rebasin: the tensor shapes do not fit the {config} architecture: {e}") from e
    events.emit("prepass_start", spaces=len(spec.spaces), max_iter=settings.iters)
    start = time.perf_counter()
    result = weight_matching(
        spec,
        ref_values,
        a_values,
        max_iter=settings.iters,
        seed=settings.seed,
        threads=settings.threads or None,
        device=settings.device,
        precision=settings.precision,
        overwrite_model=True,  # `a_values` are this pre-pass's own copies: permute them in place
        on_sweep=_sweep_done,
        on_progress=lambda event, data: events.emit(event, **data),
    )
    seconds = time.perf_counter() - start
    events.emit("prepass_end", result=result, seconds=seconds)
    final = result.final
    logger.info(
        "git_rebasin: %d permutations, %d sweeps in %.1f s, converged=%s, distance to ref x%.4f",
        len(spec.spaces),
        final.sweep,
        seconds,
        result.converged,
        result.rel_distance,
    )
    return Alignment(spec, result.perms, result), a_held  # `a_values` were permuted in place


@merge_method(identifier=IDENTIFIER, cache_factory=dict)
class rebasin:
    """Permute the hidden units of `a` to match `ref` (Git Re-Basin weight matching).

    The result computes the same function as `a` (exactly, up to float rounding) and is as close to
    `ref` as the legal permutations allow, so that averaging it with `ref` merges like units.
    """

    @staticmethod
    def map_keys(b: KeyMapBuilder) -> None:
        bound = bound_keys(key_map_output_config(b).identifier)
        own_params = [p for p in key_map_params(b) if p != "ref"]
        for key in b.keys():
            own = functools.reduce(lambda x, y: x & y, (getattr(b, p).keys[key] for p in own_params))
            # `ref[key]` is optional: a key of `a` that `ref` lacks is still permuted.
            b[key] = (own & b.ref.keys[key]) | own if key in bound else own

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._alignment: Alignment | None = None
        self._error: BaseException | None = None
        self._aligned_a: dict[str, HeldTensor] = {}
        """The pre-pass's copy of `a`, permuted; each key is handed out once, then dropped."""
        self._handed_out = 0

    def __call__(
        self,
        a: Parameter(StateDict[Tensor]),
        ref: Parameter(StateDict[Tensor]),
        iters: Parameter(int) = 100,
        seed: Parameter(int) = 0,
        threads: Parameter(int) = 0,
        device: Parameter(str) = "cpu",
        precision: Parameter(str) = "fp32",
        **kwargs,
    ) -> Return(Tensor):
        """
        :param a: the model to permute.
        :param ref: the model to align `a` to; it is only read, never changed.
        :param iters: the most weight-matching sweeps; matching stops earlier once no permutation changes.
        :param seed: seeds the order in which each sweep visits the permutations.
        :param threads: threads for the pre-pass (cost matrices and assignments); 0 picks one per CPU.
        :param device: torch device for the pre-pass products ("cpu", "cuda", "cuda:1", ...).
        :param precision: "fp32" (exact products) or "bf16" (products about 1.5x faster on CPUs with bf16 units; approximate).
        """
        key = kwargs["key"]
        config = a.model_config.identifier
        bound = ema_targets(config).get(key, key)  # an EMA weight is permuted like the key it copies
        if bound not in bound_keys(config):
            return a[key]
        alignment = self._align_once(
            config, a, ref, Settings(iters, seed, threads, device, precision), kwargs.get("cache")
        )
        held = self._aligned_a.pop(key, None) if key == bound else None  # an EMA copy is not held
        if held is not None:
            with self._lock:
                self._handed_out += 1
                if self._handed_out % TRIM_EVERY_KEYS == 0:  # the copies were freed into many heaps
                    return_freed_memory()
            return held.restored()
        return permute_tensor(alignment.spec, bound, a[key], alignment.perms)

    def _align_once(
        self, config: str, a: StateDict, ref: StateDict, settings: Settings, cache: dict | None
    ) -> Alignment:
        """The pre-pass result; the first caller computes it, the others wait for it."""
        with self._lock:
            if self._alignment is not None:
                return self._alignment
            if self._error is not None:
                raise self._error  # the same error in every waiting thread: sd-mecha reports any one
            with _arch_lock:
                arch = _arch_overrides.get(config)
            # A cache passed to sd_mecha.merge(cache={node: node.merge_method.create_cache()}) keeps
            # the permutations for further merges of the same node (e.g. trying several alphas).
            cache_key = (settings.iters, settings.seed, settings.precision, repr(arch))
            if cache is not None and cache.get("settings") == cache_key:
                self._alignment = cache["alignment"]
                return self._alignment
            try:
                self._alignment, self._aligned_a = align(
                    config, _unlimited(a), _unlimited(ref), settings, arch
                )
            except BaseException as e:
                self._error = e
                raise
            finally:
                return_freed_memory()  # the model copies of the pre-pass are gone by now
            if cache is not None:
                cache.update(settings=cache_key, alignment=self._alignment)
            return self._alignment
