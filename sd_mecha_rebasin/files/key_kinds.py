"""Keys that are not plain weights, and what every merge does with each kind: one table.

Every job (merge, align, plain average, merge-many) and `checkpoint.is_merged_key` (which the
sd-mecha-facing code consults through the jobs) look a canonical key up here; a key no row matches
is a plain weight of the config (merged when both models have it) or a key the config does not
know (kept from the base model). A new kind of key is a row of `KINDS`, not a branch in a job.

Policies (`POLICIES`):
- `merged`: merged like a weight (needs both models; otherwise kept from the one that has it).
- `kept_from_base`: the base model's (A for a merge and merge-many's reference, B for an
  alignment), as stored; absent when the base model lacks it.
- `kept_from_either`: the base model's, or the other model's when only it has it.
- `dropped`: never written (not part of the canonical layout; the loaders do not need it).
- `exact`: rebuilt from the architecture (CLIP `position_ids`, `files/repairs.py`).

Prediction type: rows with `prediction` mark how the model is sampled; `prediction_of` names a
model's type from the markers it has (eps when it has none), and a pair whose types differ merges
with one warning naming both (`prediction_mismatch`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable

MERGED = "merged"
KEPT_FROM_BASE = "kept_from_base"
KEPT_FROM_EITHER = "kept_from_either"
DROPPED = "dropped"
EXACT = "exact"
POLICIES = (MERGED, KEPT_FROM_BASE, KEPT_FROM_EITHER, DROPPED, EXACT)


@dataclasses.dataclass(frozen=True)
class KeyKind:
    """One kind of key: which canonical keys (a regex, whole key) or config component, and the policy."""

    name: str
    """Shown in the summary's kept counts and in `inspect`."""
    policy: str
    what: str
    pattern: str | None = None
    component: str | None = None
    """sd-mecha config component (e.g. "ema") whose every key is of this kind."""
    prediction: str | None = None
    """What the key says about sampling (e.g. "v-prediction"); None for other kinds."""


_CLIP_L = r"(?:cond_stage_model|conditioner\.embedders\.0)\.(?:transformer\.)?(?:text_model\.)?"

KINDS: tuple[KeyKind, ...] = (
    KeyKind("markers", KEPT_FROM_BASE, "v-prediction flag", r"v_pred", prediction="v-prediction"),
    KeyKind("markers", KEPT_FROM_BASE, "zero-terminal-SNR flag", r"ztsnr", prediction="zero terminal SNR"),
    KeyKind(
        "markers",
        KEPT_FROM_BASE,
        "EDM v-prediction sigmas (CosXL)",
        r"edm_vpred\.sigma_(?:min|max)",
        prediction="EDM v-prediction (CosXL)",
    ),
    KeyKind(
        "markers",
        KEPT_FROM_BASE,
        "EDM latent mean/std (Playground v2.5)",
        r"edm_(?:mean|std)",
        prediction="EDM (Playground v2.5)",
    ),
    KeyKind(
        "scheduler", KEPT_FROM_EITHER, "sgm denoiser sigmas (fixed by the schedule)", r"denoiser\.sigmas"
    ),
    KeyKind("buffers", EXACT, "CLIP position ids (int64 0..n-1)", r".*\.embeddings\.position_ids"),
    KeyKind("buffers", KEPT_FROM_BASE, "OpenCLIP causal attention mask", r".*\.model\.attn_mask"),
    KeyKind(
        "lcm",
        KEPT_FROM_EITHER,
        "LCM guidance projection into the time embedding's input (never permuted: it writes the "
        "timestep sinusoid's 320 inputs and reads the guidance embedding)",
        r"model\.diffusion_model\.time_embed(?:ding)?\.cond_proj\.weight",
    ),
    KeyKind(
        "dropped",
        DROPPED,
        "extra CLIP-L projection or logit scale (ComfyUI and Forge saves; SD does not use it)",
        _CLIP_L + r"(?:text_projection(?:\.weight)?|logit_scale)",
    ),
    KeyKind(
        "ema", KEPT_FROM_BASE, "EMA copies of the UNet (permuted with it in an alignment)", component="ema"
    ),
    KeyKind("scheduler", KEPT_FROM_BASE, "scheduler buffers", component="scheduler"),
)
"""The rows, first match wins (a key pattern before a component)."""

LONG_CLIP_POSITIONS = 248
"""LongCLIP's position embedding rows (CLIP's 77 otherwise)."""
POSITION_EMBEDDINGS = re.compile(
    r".*(?:\.embeddings\.position_embedding\.weight|\.model\.positional_embedding)"
)


@functools.cache
def _compiled() -> tuple[tuple[re.Pattern[str] | None, KeyKind], ...]:
    return tuple((re.compile(k.pattern) if k.pattern else None, k) for k in KINDS)


def kind_of(key: str, component: str | None = None) -> KeyKind | None:
    """The row for a canonical key (`component`: its config component, if it has one)."""
    for rx, kind in _compiled():
        if rx is not None and rx.fullmatch(key):
            return kind
        if rx is None and component is not None and kind.component == component:
            return kind
    return None


def policy_of(key: str, component: str | None = None) -> str | None:
    kind = kind_of(key, component)
    return kind.policy if kind is not None else None


def is_known(key: str) -> bool:
    """Whether a key the config does not know is a known kind (so it is not refused as foreign)."""
    return any(rx is not None and rx.fullmatch(key) for rx, _ in _compiled())


def prediction_of(keys: Iterable[str]) -> str:
    """A model's prediction type from its markers: "eps" without any, else the markers' words
    joined ("v-prediction + zero terminal SNR", "EDM v-prediction (CosXL)")."""
    found: list[str] = []
    for key in keys:
        kind = kind_of(key)
        if kind is not None and kind.prediction and kind.prediction not in found:
            found.append(kind.prediction)
    if "EDM v-prediction (CosXL)" in found and "v-prediction" in found:
        found.remove("v-prediction")
    order = [k.prediction for k in KINDS if k.prediction]
    return " + ".join(sorted(found, key=order.index)) if found else "eps"


def metadata_prediction(keys: Iterable[str]) -> str | None:
    """modelspec.prediction_type for the output: "v" for (EDM) v-prediction markers, else None
    (the family's default)."""
    return "v" if "v-prediction" in prediction_of(keys) else None


def prediction_mismatch(
    a_name: str, a_keys: Iterable[str], b_name: str, b_keys: Iterable[str], base_is_a: bool = True
) -> str | None:
    """The one warning for two models of different prediction types (None when they agree); the
    output keeps the markers of the base model (A, or B when `base_is_a` is False)."""
    pa, pb = prediction_of(a_keys), prediction_of(b_keys)
    if pa == pb:
        return None
    base, kept = (a_name, pa) if base_is_a else (b_name, pb)
    return (
        f"PREDICTION TYPES DIFFER: {a_name} is {pa} and {b_name} is {pb}; merged anyway, the output "
        f"keeps the markers of {base} ({kept}) and is sampled as that"
    )


def long_clip_problem(key: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> bool:
    """Whether two shapes of a position embedding differ in rows with one LongCLIP's 248."""
    return (
        POSITION_EMBEDDINGS.fullmatch(key) is not None
        and len(a_shape) == len(b_shape) == 2
        and a_shape[0] != b_shape[0]
        and LONG_CLIP_POSITIONS in (a_shape[0], b_shape[0])
    )


def long_clip_shape_ok(key: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Whether `shape` is the family's `expected` with LongCLIP's 248 positions (position
    embedding rows, or the [1, 248] position ids)."""
    if len(shape) != 2 or len(expected) != 2:
        return False
    if POSITION_EMBEDDINGS.fullmatch(key):
        return shape[0] == LONG_CLIP_POSITIONS and shape[1] == expected[1]
    if key.endswith(".embeddings.position_ids"):
        return shape == (1, LONG_CLIP_POSITIONS)
    return False
