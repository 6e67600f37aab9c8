"""Permutation specs derived from a model config's key layout by the rules in this package.

To add an architecture: describe its facts in `families.yaml` and, if it has module kinds the rules
in `modules.py` do not cover yet, add a rule there and a walk like `unet.py`.
"""

from __future__ import annotations

import copy
import functools
import pathlib
from collections.abc import Collection, Mapping
from typing import Any

import yaml

from ..model_configs.unet_only import UNET_ONLY_LAYOUTS, full_config, ldm_names
from ..permutations import groups
from ..permutations.spec import PermutationSpec, SpecBuilder
from .text_encoders import TEXT_ENCODERS
from .unet import UnetFacts, ldm_unet

_FAMILIES = pathlib.Path(__file__).with_name("families.yaml")


@functools.cache
def families() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(_FAMILIES.read_text())


def _deep_update(base: dict, override: Mapping) -> dict:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def config_identifier(config: Any) -> str:
    return config if isinstance(config, str) else config.identifier


def config_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every key in an sd-mecha config (or identifier)."""
    from .. import model_configs

    config = model_configs.resolve(config)
    return {key: tuple(meta.shape) for key, meta in config.keys().items()}


_HEAD_RULES = frozenset({"num_heads", "head_dim"})


def family_facts(identifier: str, arch: Mapping | None = None) -> dict[str, Any]:
    """The facts of `families.yaml` for a config, `arch` applied; a UNet-only config has its full
    config's facts (`text_encoders` included, so that overrides naming them still apply).

    The UNet's head rule is one fact: an override giving `num_heads` (heads at every level, SD1)
    or `head_dim` (heads of a fixed width, SD2/SDXL) replaces the family's rule, whichever it is.
    Raises ValueError for an unknown part or an override that gives both."""
    identifier = full_config(identifier)
    if identifier not in families():
        known = ", ".join(families())
        raise ValueError(f"no permutation rules for model config {identifier!r} (supported: {known})")
    facts = copy.deepcopy(families()[identifier])
    for name, override in (arch or {}).items():
        if name == "unet":
            rule = _HEAD_RULES & set(override)
            if len(rule) > 1:
                raise ValueError(f"arch override for {identifier}: give num_heads or head_dim, not both")
            if rule:
                facts["unet"] = {k: v for k, v in facts["unet"].items() if k not in _HEAD_RULES}
            _deep_update(facts["unet"], override)
        elif name in facts["text_encoders"]:
            _deep_update(facts["text_encoders"][name], override)
        else:
            raise ValueError(f"unknown part {name!r} in arch override for {identifier}")
    return facts


def present_text_encoders(config: Any, *shape_maps: Mapping[str, Any]) -> tuple[str, ...]:
    """The text encoders of `config` that every one of `shape_maps` (key -> shape) holds keys of.

    Only those take part in a re-basin: the UNet's cross-attention columns read a text encoder's
    stream, and permuting that stream in a model that lacks the encoder (a UNet-only file) would
    leave them reading an unpermuted encoder. None for a UNet-only config (it has none).
    """
    identifier = config_identifier(config)
    if identifier in UNET_ONLY_LAYOUTS:
        return ()
    encoders = family_facts(identifier)["text_encoders"]
    present = all(
        any(k.startswith(enc["prefix"]) for k in shapes) for enc in encoders.values() for shapes in shape_maps
    )
    return tuple(encoders) if present else ()  # all or none: a missing one would shift SDXL's context


def permutation_spec(
    config: Any,
    arch: Mapping[str, Mapping[str, Any]] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    text_encoders: Collection[str] | None = None,
) -> PermutationSpec:
    """The legal permutation group of a model, derived from its config's key layout.

    `config` is an sd-mecha model config or its identifier (`sd1-ldm`, `sd2-ldm`, `sdxl-sgm`).
    `shapes` replaces the config's key -> shape table (same key names, other sizes: tiny test
    models); `arch` overrides facts shapes do not reveal, e.g. `{"unet": {"head_dim": 8},
    "clip_g": {"heads": 6}}`.

    A UNet-only LDM file has the key names of both `sd1-ldm` and `sd2-ldm`, and sd-mecha's
    detection (key names only) takes it for `sd2-ldm`; SD1 has 8 heads, SD2 heads 64 wide, so
    the wrong facts would permute across heads. With `shapes`, the cross-attention width (768 or
    1024) settles which of the two this is.

    `text_encoders` names the text encoders that take part (default: those `shapes` has, all or
    none, see `present_text_encoders`; all the family has without `shapes`); without one, the UNet's cross-attention `to_k` / `to_v` columns stay
    as they are. A UNet-only config (`model_configs/unet_only.py`: LDM names without a prefix,
    diffusers names) gets the spec of its full config's UNet, no text encoders, in its own names.
    """
    identifier = config_identifier(config)
    if identifier in UNET_ONLY_LAYOUTS:
        to_ldm = ldm_names(identifier)
        given = shapes if shapes is not None else config_shapes(config)
        spec = permutation_spec(
            UNET_ONLY_LAYOUTS[identifier].full,
            arch,
            {to_ldm.get(k, k): tuple(s) for k, s in given.items()},
            text_encoders=(),
        )
        return spec.renamed({ldm: own for own, ldm in to_ldm.items()})
    if shapes is not None and identifier in ("sd1-ldm", "sd2-ldm"):
        from ..model_configs import sd1_or_sd2_from_shapes

        identifier = sd1_or_sd2_from_shapes(shapes) or identifier
    facts = family_facts(identifier, arch)
    if text_encoders is None and shapes is not None:
        text_encoders = present_text_encoders(identifier, shapes)
    if text_encoders is not None:
        unknown = set(text_encoders) - set(facts["text_encoders"])
        if unknown:
            raise ValueError(f"{identifier} has no text encoder {sorted(unknown)[0]!r}")
        names = list(facts["text_encoders"])
        if list(text_encoders) and names[: len(text_encoders)] != [n for n in names if n in text_encoders]:
            raise ValueError(f"{identifier}: text encoders {names} can only be left out from the end")
        facts["text_encoders"] = {k: v for k, v in facts["text_encoders"].items() if k in text_encoders}
    b = SpecBuilder(shapes if shapes is not None else config_shapes(config))
    context, pooled_space = [], None
    unet = facts["unet"]
    for name, enc in facts["text_encoders"].items():
        pooled = None
        if enc.get("pooled"):
            pooled = b.space(f"{name}.pooled", "embedding", _pooled_tree(b, enc))
            pooled_space = pooled
        context.append(TEXT_ENCODERS[enc["kind"]](b, enc["prefix"], enc["heads"], pooled))
    ldm_unet(
        b,
        unet["prefix"],
        UnetFacts(unet.get("groupnorm_groups", 32), unet.get("num_heads"), unet.get("head_dim")),
        context,
        pooled_space,
    )
    return b.build()


def _pooled_tree(b: SpecBuilder, enc: Mapping[str, Any]) -> groups.Atom:
    key = enc["prefix"] + ("text_projection" if enc["kind"] == "open_clip" else "text_projection.weight")
    shape = b.shape(key)
    return groups.Atom(shape[1] if enc["kind"] == "open_clip" else shape[0])
