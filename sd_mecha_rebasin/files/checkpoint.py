"""Input checkpoints: reading, validation, family detection and the policy for keys nobody merges.

Everything here works from a file's header (safetensors) or one load (pickles) before any merge
starts, so that a bad input fails in seconds with one line naming the file and the problem, never
minutes later inside sd-mecha. `UserError` is the one exception type for such problems.

Key policy (see `is_merged_key` and `jobs.assemble`): the output has the key layout of the base
model (A for a merge, B for an alignment). The config's floating-point weights (text encoders,
UNet, VAE) present in both models are merged; every key that is not a plain weight follows its row
of `key_kinds.KINDS` (EMA weights, scheduler buffers, markers, position ids, extra projections,
...); keys sd-mecha's config does not know are kept from the base model with their stored dtype, and
so are weights the other model lacks. Other keys only in the other model are left out, with a
warning. Keys under the UNet or text-encoder prefixes that neither the config nor the table knows
are refused (they would stay unpermuted). Files in other tools' key layouts are read as canonical
(`key_layouts`), before detection.

Legacy `.ckpt` / `.pt` / `.pth` pickles are read with `torch.load(weights_only=True)` (memory-mapped
when the file is in the zip format) and handed to sd-mecha through the model format that
`sd_mecha_formats.register()` adds, so sd-mecha streams them like safetensors and recipes name the
real file.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import pickle
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from ..common.errors import UserError
from ..common.workers import worker_pool
from ..model_configs.unet_only import UNET_ONLY_LAYOUTS, full_config, ldm_names, unet_only_config
from . import key_kinds, key_layouts, quantized, safetensors_file
from .safetensors_file import HeaderError, pickle_signature
from .variants import same_but_input_channels, variant_shape_ok

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")

FAMILY_NAMES = {"sd1-ldm": "SD1", "sd2-ldm": "SD2", "sdxl-sgm": "SDXL"}
FAMILY_NAMES.update({ident: FAMILY_NAMES[layout.full] for ident, layout in UNET_ONLY_LAYOUTS.items()})
"""sd-mecha config identifier -> the family name shown to users (a UNet-only config: its family's)."""

MARKER_KEYS = frozenset(
    {"v_pred", "ztsnr", "edm_vpred.sigma_min", "edm_vpred.sigma_max", "edm_mean", "edm_std"}
)
"""Flags and constants that describe how a model is sampled, not weights (the "markers" rows of
`key_kinds.KINDS`, which says what a merge does with them)."""


@dataclasses.dataclass
class Checkpoint:
    """One input file: its tensors' names, shapes and dtypes, and (after `detect`) its family."""

    path: pathlib.Path
    """The path as the user gave it (used in messages)."""
    kind: str
    """"safetensors", "pickle" or "gguf"."""
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    metadata: dict[str, str]
    """The safetensors `__metadata__` (empty for pickles)."""
    config: str | None = None
    """sd-mecha config identifier of the detected family."""
    canonical: dict[str, str] = dataclasses.field(default_factory=dict)
    """File key -> the config's key name (aliases resolved); keys the config lacks map to themselves."""
    header: safetensors_file.Header | None = None
    """The checked safetensors header (None for pickles and GGUF)."""
    quantized: quantized.ScaledFp8File | quantized.GGUFFile | None = None
    """The dequantizing reader of a quantized file (fp8 scaled, GGUF; `files/quantized.py`): then
    `shapes`/`dtypes` are what it yields (dequantized weights float32, scale keys absent)."""
    layout: key_layouts.Layout | None = None
    """How a file saved in another tool's key layout is read (`files/key_layouts.py`): then
    `shapes`/`dtypes` are in the canonical layout and `iter_tensors` yields canonical keys."""

    @property
    def extra_bytes(self) -> int:
        """Bytes of a safetensors file that belong to no tensor (ignored; the caller warns)."""
        return self.header.extra_bytes if self.header is not None else 0

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def family(self) -> str:
        return FAMILY_NAMES.get(self.config or "", self.config or "unknown")

    def canonical_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.canonical.get(k, k): s for k, s in self.shapes.items()}

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """`canonical_shapes` in the names of the full config (a UNet-only file's keys renamed to
        `model.diffusion_model.` LDM names), so that files of two layouts can be compared."""
        names = ldm_names(self.config or "")
        return {names.get(k, k): s for k, s in self.canonical_shapes().items()}

    @property
    def full_config(self) -> str:
        """The full config of its family (sd1-ldm, sd2-ldm, sdxl-sgm), whatever its layout."""
        return full_config(self.config or "")

    @property
    def unet_only(self) -> bool:
        """A UNet without text encoders: a UNet-only config, or a full config's UNet alone."""
        from ..architectures import present_text_encoders

        return self.config is not None and not present_text_encoders(self.config, self.canonical_shapes())

    def iter_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for `keys` (names of `shapes`: canonical when the file's layout is not)."""
        if self.layout is not None:
            yield from self.layout.read(keys, self._iter_file_tensors)
            return
        yield from self._iter_file_tensors(keys)

    def _iter_file_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        if self.kind == "pickle":
            sd = load_pickle(self.path)
            for key in keys:
                yield key, sd[key]
            return
        try:
            if self.quantized is not None:
                yield from self.quantized.read_tensors(keys)
                return
            assert self.header is not None
            yield from safetensors_file.read_tensors(self.path, self.header, keys)
        except OSError as e:
            raise UserError(f"cannot read: {e.strerror or e}", self.path) from None

    def parameters(self) -> int:
        total = 0
        for shape in self.shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


# --------------------------------------------------------------------------------------------
# Opening files


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint's header (safetensors) or load it (pickle); raise UserError if unreadable.

    The type comes from the suffix and is confirmed from the content: a file is first parsed as
    safetensors (whatever its first bytes: they are a length), and only when that fails is it
    recognised as a PyTorch checkpoint by its full signature (`safetensors_file.pickle_signature`).
    """
    path = pathlib.Path(path)
    ckpt = _open_file(path)
    layout = key_layouts.plan(path, ckpt.shapes, ckpt.dtypes)
    if not layout.identity:
        ckpt.layout, ckpt.shapes, ckpt.dtypes = layout, layout.shapes, layout.dtypes
    return ckpt


def _open_file(path: pathlib.Path) -> Checkpoint:
    """`open_checkpoint` in the file's own key names."""
    if not path.exists():
        raise UserError("no such file", path)
    if path.is_dir():
        key_layouts.refuse_diffusers_folder(path)
        raise UserError("is a directory, not a checkpoint file", path)
    if not os.access(path, os.R_OK):
        raise UserError("permission denied (not readable)", path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES and path.suffix != suffix:  # sd-mecha matches the suffix exactly
        raise UserError(
            f"sd-mecha reads only lower-case {suffix} files; rename it to {path.stem}{suffix}", path
        )
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + quantized.GGUF_SUFFIXES:
        raise UserError(
            f"unsupported file type {suffix or '(no extension)'!r}: expected .safetensors, .ckpt, .pt, .pth or .gguf",
            path,
        )
    if suffix in quantized.GGUF_SUFFIXES:
        gguf = quantized.open_gguf(path)
        return Checkpoint(path, "gguf", gguf.shapes, gguf.dtypes, {}, quantized=gguf)
    try:
        header: safetensors_file.Header | HeaderError = safetensors_file.read_header(path)
        head = _read_head(path)
    except HeaderError as e:
        header = e
        head = _read_head(path)
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror or e}", path) from None
    if suffix in SAFETENSORS_SUFFIXES:
        if isinstance(header, HeaderError):
            kind = pickle_signature(head)
            if kind is not None:
                raise UserError(
                    f"not a safetensors file: it is a PyTorch {kind} checkpoint; rename it to .ckpt", path
                )
            if quantized.is_gguf(head):
                raise UserError("not a safetensors file: it is a GGUF file; rename it to .gguf", path)
            raise UserError(str(header), path)
        return _open_safetensors(path, header)
    if not isinstance(header, HeaderError):
        raise UserError(f"is a safetensors file named {suffix}; rename it to .safetensors", path)
    if pickle_signature(head) is None:
        raise UserError("not a PyTorch checkpoint (neither a zip archive nor a pickle)", path)
    return _open_pickle(path)


def _read_head(path: pathlib.Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(16)
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror or e}", path) from None


def _open_safetensors(path: pathlib.Path, header: safetensors_file.Header) -> Checkpoint:
    if not header.tensors:
        raise UserError("holds no tensors", path)
    scaled = quantized.open_scaled_fp8(path, header)  # None unless it has fp8 scales
    if scaled is not None:
        return Checkpoint(
            path, "safetensors", scaled.shapes, scaled.dtypes, dict(header.metadata), header, quantized=scaled
        )
    shapes = {k: e.shape for k, e in header.tensors.items()}
    dtypes = {k: e.dtype for k, e in header.tensors.items()}
    return Checkpoint(path, "safetensors", shapes, dtypes, dict(header.metadata), header=header)


_pickle_cache: dict[pathlib.Path, dict[str, torch.Tensor]] = {}
_pickle_lock = threading.Lock()


def load_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .ckpt/.pt file (containers unwrapped, see `_unwrap`), loaded once and cached."""
    path = pathlib.Path(path)
    resolved = path.resolve()
    with _pickle_lock:
        if resolved in _pickle_cache:
            return _pickle_cache[resolved]
        try:
            try:
                obj = torch.load(resolved, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(resolved, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as e:  # noqa: BLE001 - torch.load raises many types for bad files
            text = str(e)
            if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
                reason = _first_line(text.replace("Weights only load failed.", "")) or "unsupported content"
                raise UserError(
                    "refused: this pickle needs more than plain tensors to load (torch.load weights_only=True: "
                    f"{reason}); convert it to .safetensors with a tool you trust",
                    path,
                ) from None
            reason = f"{type(e).__name__}: {_first_line(text)}" if _first_line(text) else type(e).__name__
            raise UserError(
                f"not a readable PyTorch checkpoint (truncated or corrupt: {reason})", path
            ) from None
        sd = _unwrap(obj)
        if sd is None:
            raise UserError(
                f"holds no tensors: its top level is {_describe_top(obj)} "
                f"(no tensors under {', '.join(CONTAINER_KEYS)})",
                path,
            )
        _pickle_cache[resolved] = sd
        return sd


def release_pickles() -> None:
    """Forget every cached pickle (call when a command is done)."""
    with _pickle_lock:
        _pickle_cache.clear()


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line[:200]


CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
"""Keys under which training scripts nest the tensors (Lightning, plain PyTorch, DataParallel)."""

_MAX_NESTING = 4


def _unwrap(obj: Any, depth: int = 0) -> dict[str, torch.Tensor] | None:
    """The tensors of a loaded checkpoint: containers (`CONTAINER_KEYS`, nested) unwrapped and a
    `module.` prefix on every key (DataParallel) removed; None when there are none."""
    if not isinstance(obj, Mapping):
        return None
    if depth < _MAX_NESTING:
        for name in CONTAINER_KEYS:
            inner = obj.get(name)
            if isinstance(inner, Mapping):
                sd = _unwrap(inner, depth + 1)
                if sd:
                    return sd
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd or None


def _describe_top(obj: Any) -> str:
    """What a checkpoint without tensors holds at its top level, for the refusal."""
    if isinstance(obj, Mapping):
        if not obj:
            return "an empty dict"
        names = sorted(str(k) for k in obj)
        shown = ", ".join(repr(n[:40]) for n in names[:6])
        more = f" and {len(names) - 6} more" if len(names) > 6 else ""
        return f"a dict with keys {shown}{more}"
    return f"a {type(obj).__name__}"


def _open_pickle(path: pathlib.Path) -> Checkpoint:
    sd = load_pickle(path)
    quantized.refuse_in_pickle(path, sd)
    readable = set(safetensors_file.DTYPES.values())
    sparse = sorted(k for k, v in sd.items() if v.layout != torch.strided)
    if sparse:
        raise UserError(
            f"{sparse[0]} is a {str(sd[sparse[0]].layout).removeprefix('torch.')} tensor, not a dense one",
            path,
        )
    odd = sorted(k for k, v in sd.items() if v.dtype not in readable)
    if odd:
        dtype = str(sd[odd[0]].dtype).removeprefix("torch.")
        raise UserError(f"{odd[0]} has dtype {dtype}, which this tool does not read", path)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    dtypes = {k: v.dtype for k, v in sd.items()}
    return Checkpoint(path, "pickle", shapes, dtypes, {})


# --------------------------------------------------------------------------------------------
# Family detection


_OTHER_KINDS: list[tuple[str, str]] = [
    (
        r"(^|\.)lora_(up|down|A|B)\b|^lora_(unet|te\d?)_|\.(hada_w1_a|lokr_w1|oft_blocks)\b|\.alpha$",
        "a LoRA/LyCORIS network",
    ),
    (r"^(emb_params|string_to_param|clip_[lg])$", "a textual-inversion embedding"),
    (r"^control_model\.|\.input_hint_block\.", "a ControlNet"),
    (r"joint_blocks\.", "a Stable Diffusion 3 model"),
    (r"(^|\.)double_blocks\.", "a FLUX model"),
    (
        r"^unet\.(down_blocks|up_blocks|mid_block)\.",
        "a diffusers UNet under a unet. prefix (save it without the prefix)",
    ),
    (r"^(down_blocks|up_blocks|mid_block)\.", "an incomplete diffusers UNet (no conv_in.weight)"),
    (r"^(text_model|text_encoder)\.", "a text encoder only"),
    (r"^(input_blocks|middle_block|output_blocks)\.", "an incomplete UNet (no input_blocks.0.0.weight)"),
    (r"^(first_stage_model\.)?(encoder|decoder)\.(conv_in|down|up|mid)", "a VAE only"),
]


def _what_else(keys: Iterable[str]) -> str:
    keys = list(keys)
    for pattern, what in _OTHER_KINDS:
        rx = re.compile(pattern)
        if any(rx.search(k) for k in keys):
            return what
    sample = ", ".join(sorted(keys)[:2])
    return f"an unrecognised model ({len(keys)} tensors, e.g. {sample})"


GGUF_FAMILIES = {"sd1": "sd1-ldm", "sdxl": "sdxl-sgm"}
"""GGUF `general.architecture` -> full config: the family of a GGUF UNet whose width tells none."""


def _family_hint(ckpt: Checkpoint) -> str | None:
    """The family a file says it is, beside its shapes: a GGUF's architecture, the demo's mark."""
    from ..architectures.small import CONFIG, DEMO_LAYOUT, DEMO_LAYOUT_KEY

    if isinstance(ckpt.quantized, quantized.GGUFFile):
        return GGUF_FAMILIES.get(ckpt.quantized.architecture)
    return CONFIG if ckpt.metadata.get(DEMO_LAYOUT_KEY) == DEMO_LAYOUT else None


def detect_family(ckpt: Checkpoint) -> str:
    """Set and return `ckpt.config` (sd1-ldm, sd2-ldm or sdxl-sgm); UserError for anything else."""
    from .. import model_configs
    from ..model_configs import sd1_or_sd2_from_shapes

    keys = ckpt.shapes
    unet = "model.diffusion_model."
    if not any(k.startswith(unet) for k in keys):  # a UNet-only layout (model_configs/unet_only.py)?
        try:
            config = unet_only_config(keys, _family_hint(ckpt))
        except ValueError as e:
            raise UserError(f"is {e}", ckpt.path) from None
        if config is not None:
            ckpt.config, ckpt.canonical = config, {k: k for k in keys}
            return config
        raise UserError(f"not a Stable Diffusion checkpoint: looks like {_what_else(keys)}", ckpt.path)
    if any(k.startswith(unet + "joint_blocks.") for k in keys):
        raise UserError("is a Stable Diffusion 3 model; only SD1, SD2 and SDXL are supported", ckpt.path)
    if any(k.startswith(unet + "double_blocks.") for k in keys):
        raise UserError("is a FLUX model; only SD1, SD2 and SDXL are supported", ckpt.path)
    if any(k.startswith("conditioner.embedders.") for k in keys) or unet + "label_emb.0.0.weight" in keys:
        if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            raise UserError("is an SDXL refiner; only SD1, SD2 and SDXL base models are supported", ckpt.path)
        config = "sdxl-sgm"
    else:
        config = sd1_or_sd2_from_shapes(keys)
        if config is None:
            if any(k.startswith("cond_stage_model.model.") for k in keys):
                config = "sd2-ldm"
            elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
                config = "sd1-ldm"
            elif _family_hint(ckpt) is not None:
                config = _family_hint(ckpt)
            else:
                raise UserError(
                    "is not SD1, SD2 or SDXL (no cross-attention or text encoder keys)", ckpt.path
                )
    ckpt.config = config
    aliases = model_configs.resolve(config).aliases()
    reverse = {alias: key for key, names in aliases.items() for alias in names}
    ckpt.canonical = {k: reverse.get(k, k) for k in keys}
    return config


# --------------------------------------------------------------------------------------------
# Key policy and validation


def _config(config: str):
    from .. import model_configs

    return model_configs.resolve(config)


def component_of_keys(config: str) -> dict[str, str]:
    """Config key -> its component name (clip_l, diffuser, vae, ema, scheduler, ...)."""
    out = {}
    for name, component in _config(config).components().items():
        for key in component.keys():
            out[key] = name
    return out


def is_merged_key(config: str, key: str, dtype: torch.dtype | None = None) -> bool:
    """Whether a (canonical) key takes part in the merge; the others are kept from one model as they are.

    Merged: the config's floating-point weights (text encoders, UNet, VAE) and the `key_kinds` rows
    whose policy is "merged". Not merged: every other row of `key_kinds.KINDS` (EMA copies, scheduler
    buffers, markers, position_ids, ...), integer buffers and keys the config does not know.
    """
    policy = key_kinds.policy_of(key, component_of_keys_cached(config).get(key))
    if policy is not None:
        return policy == key_kinds.MERGED
    meta = _config(config).keys().get(key)
    if meta is None:
        return False
    return meta.dtype.is_floating_point and (dtype is None or dtype.is_floating_point)


def merge_policy(config: str, key: str) -> str | None:
    """The `key_kinds` policy of a canonical key of `config` (None: a plain weight of the config, or
    a key neither the config nor the table knows)."""
    return key_kinds.policy_of(key, component_of_keys_cached(config).get(key))


_components_cache: dict[str, dict[str, str]] = {}


def component_of_keys_cached(config: str) -> dict[str, str]:
    if config not in _components_cache:
        _components_cache[config] = component_of_keys(config)
    return _components_cache[config]


def permuted_prefixes(config: str) -> tuple[str, ...]:
    """Key prefixes of the components the permutation spec covers (UNet and text encoders)."""
    from ..architectures import families

    if config in UNET_ONLY_LAYOUTS:
        return ("",)  # every key of a UNet-only file is a UNet key
    facts = families()[config]
    return (facts["unet"]["prefix"], *(enc["prefix"] for enc in facts["text_encoders"].values()))


_VARIANT_HINTS = {
    ("model.diffusion_model.input_blocks.0.0.weight", 1, 9): " (an inpainting model?)",
    ("model.diffusion_model.input_blocks.0.0.weight", 1, 8): " (an instruct-pix2pix model?)",
}


def _fmt(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def validate(ckpt: Checkpoint, expected: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Refuse a checkpoint whose permuted parts differ from its family's layout.

    `expected` is key -> shape of the family (default: the sd-mecha config's; tests pass the shapes
    of tiny models). The first UNet convolution may have the input channels of an inpainting (9) or
    instruct-pix2pix (8) model. Keys under the UNet / text-encoder prefixes that the config does not know would
    be left unpermuted in a permuted model, so they are refused as well.
    """
    assert ckpt.config is not None
    config_keys = _config(ckpt.config).keys()
    if expected is None:
        expected = {k: tuple(m.shape) for k, m in config_keys.items()}
    elif ckpt.config in UNET_ONLY_LAYOUTS:  # `expected` is in the full config's names
        expected = {own: expected[ldm] for own, ldm in ldm_names(ckpt.config).items() if ldm in expected}
    prefixes = permuted_prefixes(ckpt.config)
    unknown = [
        k
        for k, canon in ckpt.canonical.items()
        if canon not in config_keys and k.startswith(prefixes) and not key_kinds.is_known(canon)
    ]
    if unknown:
        raise UserError(
            f"has {len(unknown)} key(s) that {ckpt.family} models do not have (e.g. {sorted(unknown)[0]}): "
            f"not a plain {ckpt.family} checkpoint",
            ckpt.path,
        )
    for key, shape in ckpt.shapes.items():
        canon = ckpt.canonical[key]
        if canon in config_keys and ckpt.dtypes[key] == torch.uint8:  # sd-mecha 1.1.8 cannot read U8
            raise UserError(f"{key} has dtype uint8, which sd-mecha does not read", ckpt.path)
        if canon not in expected or not is_merged_key(ckpt.config, canon, ckpt.dtypes[key]):
            continue
        want = tuple(expected[canon])
        full_name = ldm_names(ckpt.config).get(canon, canon)
        if shape != want and key_kinds.long_clip_shape_ok(canon, shape, want):
            continue  # a LongCLIP text encoder (248 positions); pairs are checked in check_pair
        if shape != want and not variant_shape_ok(full_name, shape, want):  # inpainting, instruct-pix2pix
            hint = ""
            for (hkey, axis, value), text in _VARIANT_HINTS.items():
                if full_name == hkey and len(shape) > axis and shape[axis] == value:
                    hint = text
            raise UserError(
                f"{key} has shape {_fmt(shape)}, {ckpt.family} ({ckpt.config}) expects {_fmt(want)}{hint}",
                ckpt.path,
            )


def check_pair(a: Checkpoint, b: Checkpoint) -> None:
    """Refuse two checkpoints that cannot be aligned: other families, other shapes, nothing shared.

    Input-channel variants (inpainting, instruct-pix2pix) pass here; `variants.check_variant_pair`
    decides which of their pairs merge.
    """
    if a.full_config != b.full_config:
        raise UserError(
            f"is {b.family} ({b.config}) but {a.name} is {a.family} ({a.config}); both models must be of the same family",
            b.path,
        )
    config = a.full_config
    a_shapes, b_shapes = a.full_shapes(), b.full_shapes()  # a UNet-only file against a full one
    shared = [k for k in a_shapes if k in b_shapes and is_merged_key(config, k)]
    for key in shared:
        if key_kinds.long_clip_problem(key, a_shapes[key], b_shapes[key]):
            long_b = b_shapes[key][0] == key_kinds.LONG_CLIP_POSITIONS
            raise UserError(
                f"{key} has shape {_fmt(b_shapes[key])} but {a.name} has {_fmt(a_shapes[key])}: "
                f"{'this file' if long_b else a.name} has a LongCLIP text encoder "
                f"({key_kinds.LONG_CLIP_POSITIONS} positions) and the other a 77-position one; they "
                "cannot be merged (positions are never padded or cut)",
                b.path,
            )
        if a_shapes[key] != b_shapes[key] and not same_but_input_channels(key, a_shapes[key], b_shapes[key]):
            raise UserError(
                f"{key} has shape {_fmt(b_shapes[key])} but {a.name} has {_fmt(a_shapes[key])}", b.path
            )
    prefixes = permuted_prefixes(config)
    if not any(k.startswith(prefixes) for k in shared):
        raise UserError(f"shares no UNet or text-encoder weights with {a.name}", b.path)


def check_finite(ckpt: Checkpoint, keys: Iterable[str] | None = None, threads: int = 0) -> None:
    """Raise UserError naming the first key (in file order) holding NaN or Inf.

    A float32 sum per tensor is the fast test (NaN and Inf propagate; fp16/bf16 never overflow it);
    a failing tensor is confirmed element-wise, so a huge but finite fp32 tensor is not refused.
    """
    keys = [k for k in (ckpt.shapes if keys is None else keys) if ckpt.dtypes[k].is_floating_point]
    if not keys:
        return
    threads = threads or min(4, os.cpu_count() or 1)
    chunks = [keys[i::threads] for i in range(threads)]

    def scan(chunk: list[str]) -> list[tuple[str, str]]:
        bad = []
        for key, t in ckpt.iter_tensors(chunk):
            if t.element_size() == 1:  # fp8: torch has no isfinite for it; every value fits fp16
                t = t.to(torch.float16)
            acc = torch.float64 if t.dtype == torch.float64 else torch.float32
            if t.numel() and not bool(torch.isfinite(t.sum(dtype=acc))):
                if not bool(torch.isfinite(t).all()):
                    what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                    bad.append((key, what))
        return bad

    with worker_pool(threads) as pool:
        found = [item for part in pool.map(scan, chunks) for item in part]
    if found:
        order = {k: i for i, k in enumerate(keys)}
        key, what = min(found, key=lambda item: order[item[0]])
        more = f" (and {len(found) - 1} more key(s))" if len(found) > 1 else ""
        raise UserError(f"{key} contains {what} values{more}", ckpt.path)


def ema_map(keys: Iterable[str], unet_keys: Iterable[str]) -> dict[str, str]:
    """EMA key -> UNet key, for every EMA key among `keys` that copies one of `unet_keys`."""
    by_flat = {k[len("model.") :].replace(".", ""): k for k in unet_keys if k.startswith("model.")}
    out = {}
    for key in keys:
        if key.startswith("model_ema."):
            target = by_flat.get(key[len("model_ema.") :])
            if target is not None:
                out[key] = target
    return out
