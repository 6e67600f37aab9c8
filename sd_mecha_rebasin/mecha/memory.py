"""Re-basin of models that another program holds in memory (ComfyUI's MODEL and CLIP), with no file.

The models come in that program's key names (a layout of `key_layouts.MEMORY_RULES`); they are
read in the canonical layout through `key_layouts.plan` and aligned by `merge_method.align`, the
pre-pass that `git_rebasin` runs inside `sd-rebasin align` and `merge`: the same keys in the same
order, the same compact copies, the same weight matching, so the permutations and the permuted
tensors equal the command line's for the same two models. The permuted tensors of the keys that
moved come back in the program's names (`Layout.to_source`: a fused q/k/v split, a transposed
projection transposed back), ready to be set as weight patches; nothing else is copied.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from sd_mecha import StateDictKeyError

from .. import model_configs
from ..common.errors import UserError
from ..files import key_layouts
from ..files.checkpoint import FAMILY_NAMES
from ..permutations.spec import Permutations, PermutationSpec
from ..search.matching import MatchResult
from .merge_method import Settings, _arch_lock, _arch_overrides, align, bound_keys

UNET_PREFIX = "model.diffusion_model."
CROSS_ATTENTION_WIDTHS = {768: "sd1-ldm", 1024: "sd2-ldm", 2048: "sdxl-sgm"}
"""`attn2.to_k.weight` shape[1] -> config (DESIGN 8: survives every layout); 1280 is SDXL's refiner."""
TEXT_ENCODER_PREFIXES = {
    "conditioner.embedders.": "sdxl-sgm",
    "cond_stage_model.model.": "sd2-ldm",
    "cond_stage_model.transformer.": "sd1-ldm",
}
"""Canonical text-encoder prefix -> the family it belongs to (names settle what widths cannot:
tiny test models)."""


class MemoryModel(Mapping[str, torch.Tensor]):
    """A model held in memory, read in the canonical layout as `merge_method.align` reads a model
    (a mapping with `model_config`; a missing key raises sd-mecha's StateDictKeyError)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], layout: key_layouts.Layout, config: str):
        self.tensors = tensors
        self.layout = layout
        self.model_config = model_configs.resolve(config)

    def _read(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return ((k, self.tensors[k]) for k in keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.layout.sources:
            raise StateDictKeyError(key)
        return next(iter(self.layout.read([key], self._read)))[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.sources)

    def __len__(self) -> int:
        return len(self.layout.sources)


@dataclasses.dataclass
class MemoryAlignment:
    """What aligning a model held in memory gave."""

    config: str
    patches: dict[str, torch.Tensor]
    """The model's own key names -> its permuted tensor, for the keys that moved only (the others
    are the model's as they are). Tensors are compact copies (fp16 where that holds every value)."""
    text_encoders: bool
    """Whether the text encoders took part (False: both models' UNets only, see `align`)."""
    spec: PermutationSpec
    perms: Permutations
    result: MatchResult


def read_layout(
    tensors: Mapping[str, torch.Tensor], layout: str, name: str
) -> tuple[key_layouts.Layout, dict[str, torch.Tensor]]:
    """The canonical reading of a model in a memory layout, and the tensors it reads (the keys that
    no checkpoint has, `key_layouts.MEMORY_ONLY`, left out). `name` names the model in errors."""
    rules = {layout: key_layouts.MEMORY_RULES[layout]}
    only = key_layouts.MEMORY_ONLY.get(layout)
    kept = {k: t for k, t in tensors.items() if only is None or not only.fullmatch(k)}
    shapes = {k: tuple(t.shape) for k, t in kept.items()}
    dtypes = {k: t.dtype for k, t in kept.items()}
    return key_layouts.plan(pathlib.Path(name), shapes, dtypes, rules=rules), kept


def detect_config(shapes: Mapping[str, tuple[int, ...]], name: str) -> str:
    """sd1-ldm, sd2-ldm or sdxl-sgm for canonical key shapes; UserError (one line) for a model this
    package cannot re-base."""
    unet = [k for k in shapes if k.startswith(UNET_PREFIX)]
    if not any(k.startswith(UNET_PREFIX + "input_blocks.") for k in unet):
        what = "no UNet" if not unet else "not an SD1/SD2/SDXL UNet (no input_blocks)"
        raise UserError(f"cannot be re-based: {what}; only SD1, SD2 and SDXL models can", name)
    for prefix, config in TEXT_ENCODER_PREFIXES.items():
        if any(k.startswith(prefix) for k in shapes):
            if prefix == "conditioner.embedders." and any(
                k.startswith("conditioner.embedders.0.model.") for k in shapes
            ):
                break  # the refiner's OpenCLIP-G alone: told by the width below
            return config
    widths = [s[1] for k, s in shapes.items() if k.endswith(".attn2.to_k.weight") and len(s) == 2]
    if widths and widths[0] in CROSS_ATTENTION_WIDTHS:
        return CROSS_ATTENTION_WIDTHS[widths[0]]
    if widths and widths[0] == 1280:
        raise UserError(
            "cannot be re-based: it is an SDXL refiner; only SD1, SD2 and SDXL base models can", name
        )
    raise UserError(
        f"cannot be re-based: its cross-attention width is {widths[0] if widths else 'unknown'}, "
        "not SD1's 768, SD2's 1024 or SDXL's 2048",
        name,
    )


def check_keys(config: str, shapes: Mapping[str, tuple[int, ...]], name: str) -> None:
    """UserError for a UNet with keys the family's rules do not know (an unCLIP's label_emb, say:
    left unpermuted, they would break the function) or without keys they need."""
    known = set(model_configs.resolve(config).keys())
    family = FAMILY_NAMES.get(config, config)
    extra = sorted(k for k in shapes if k.startswith(UNET_PREFIX) and k not in known)
    if extra:
        raise UserError(
            f"cannot be re-based: its UNet has {len(extra)} key(s) that {family} does not have "
            f"(first: {extra[0][len(UNET_PREFIX) :]}); a variant of {family} the permutation rules do not cover",
            name,
        )
    missing = [k for k in bound_keys(config) if k.startswith(UNET_PREFIX) and k not in shapes]
    if missing:
        raise UserError(
            f"cannot be re-based: its UNet lacks {min(missing)[len(UNET_PREFIX) :]} "
            f"({len(missing)} key(s) of {family} missing)",
            name,
        )


def align_in_memory(
    ref: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    layout: str = key_layouts.COMFYUI,
    *,
    iters: int = 100,
    seed: int = 0,
    threads: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    arch: Mapping[str, Mapping[str, Any]] | None = None,
    config: str | None = None,
    names: tuple[str, str] = ("model A", "model B"),
) -> MemoryAlignment:
    """Align `model` to `ref`, both held in memory in `layout`'s key names (UNet and text encoders,
    or the UNet alone: then only the UNets are aligned, as the command line does with a UNet-only
    file). Returns the moved keys' permuted tensors in `model`'s names.

    `arch`, `config`: facts and family of small test models, whose widths tell no family (see
    `permutation_spec`; without `arch`, those set by `merge_method.arch_override`, as for the merge
    methods); real models need neither. UserError (one line) for models of
    two families or a model this package cannot re-base; progress goes to `events` listeners.
    """
    layouts: list[key_layouts.Layout] = []
    configs: list[str] = []
    for tensors, name in ((ref, names[0]), (model, names[1])):
        plan, _ = read_layout(tensors, layout, name)
        found = config or detect_config(plan.shapes, name)
        check_keys(found, plan.shapes, name)
        layouts.append(plan)
        configs.append(found)
    if configs[0] != configs[1]:
        family = [FAMILY_NAMES[c] for c in configs]
        raise UserError(
            f"{names[0]} is {family[0]}, {names[1]} is {family[1]}: re-basin aligns two models of one family"
        )
    config = configs[0]
    if arch is None:  # small test models in a server: the facts set with `merge_method.arch_override`
        with _arch_lock:
            arch = _arch_overrides.get(config)
    ref_view = MemoryModel(ref, layouts[0], config)
    model_view = MemoryModel(model, layouts[1], config)
    try:
        alignment, aligned = align(
            config, model_view, ref_view, Settings(iters, seed, threads, device, precision), arch
        )
    except ValueError as e:  # shapes that differ or do not fit the rules: one line
        raise UserError(str(e).removeprefix("git_rebasin: ")) from None
    spec, perms = alignment.spec, alignment.perms
    patches: dict[str, torch.Tensor] = {}
    for key, held in aligned.items():
        if all(spec.gather_index(key, axis, perms) is None for axis in spec.axes.get(key, {})):
            continue  # unmoved: the model's own tensor stays
        patches.update(layouts[1].to_source(key, held.value))
    aligned.clear()
    text = any(not k.startswith(UNET_PREFIX) for k in spec.axes)
    return MemoryAlignment(config, patches, text, spec, perms, alignment.result)
