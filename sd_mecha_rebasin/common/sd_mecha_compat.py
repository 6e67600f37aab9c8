"""What differs between the sd-mecha versions this package supports (>=1.1.6,<1.3), in one place.

Imported first by the package, so every layer sees the same sd-mecha whatever its version. Tested on
1.1.6, 1.1.7, 1.1.8 (releases) and 1.2.0 (the development branch, `TESTED_VERSIONS`); other modules
reach sd-mecha's internals only through the names below.

Measured from the 1.1.6, 1.1.7 and 1.1.8 wheels: only helpers.py, merging.py, streaming.py (and a
reformatted logistics.py) differ. merge_methods.py (the `rebasin` interface, its `candidates` list
and `dispatch`), the builtin `rebasin_sdxl_sgm`, model_configs.py (incl. `missing_key_handler`),
graph finalization and the .mecha serializer are byte-identical.

1. fp8 names (fixed in 1.1.8, streaming.py): 1.1.6/1.1.7 unpack the tuple ("F8_E4M3FN",
   "float8_e4m3fn") as (dtype_key, sft_key), test hasattr(torch, "F8_E4M3FN"), and so register no fp8
   name: reading an fp8 .safetensors raises KeyError 'F8_E4M3', writing fp8 to a file raises
   KeyError torch.float8_e4m3fn. `patch_fp8_dtype_names` adds 1.1.8's entries (setdefault: a no-op on
   1.1.8, where the tables come out identical).
2. `merge(allow_empty_merge=)` (1.1.7): `merge_kwargs` drops it where sd-mecha lacks it. A recipe
   without output keys raises RuntimeError("... produces no output keys ...") on 1.1.7+, and a bare
   KeyError(<root recipe node>) on 1.1.6.

Against 1.1.8, the 1.2.0 development branch (commit 42ef3e2) differs where this package looks:

3. The keys map (`keys_map.py`): `KeyMapBuilder` has no `output_config` / `params` attributes (its
   fields are private); the output config is `getattr(b, "return").config` and, for inputs that
   share one config, the parameter names are `b.keys.params`. `b.keys[...]`, `b.<param>.keys[...]`,
   `&`, `|` and `b[...] = ...` behave alike. `key_map_output_config` / `key_map_params` hide this.
4. The state dict a merge method gets (`merging.MergeNodeWrapperStateDict`): 1.1.x limits reads
   through `input_keys_constraints` (None: no limit) and lists the config's keys; 1.2.0 limits
   them through `validate_mm_contract` and lists only the declared inputs (`inputs`).
   `unlimited_view` gives a view without the limit that lists the config's keys on both.
5. 1.2.0 lacks 1.1.6's `missing_key_handler` and 1.1.7's `allow_empty_merge` (2. covers it), still
   has 1.1.6's fp8 name bug (1. covers it), and renames `Parameter(interface=)` /
   `Return(interface=)` to `annotation=` (this package passes them positionally). The `rebasin`
   interface (`MergeMethodInterface.candidates`, `.dispatch`, `.signature`) is unchanged.
"""

import copy
import importlib.metadata
import inspect
import re
from typing import Any

import sd_mecha
import torch
from sd_mecha import keys_map as _keys_map
from sd_mecha import streaming as _streaming
from sd_mecha.keys_map import KeyMapBuilder

SD_MECHA_RANGE = ((1, 1, 6), (1, 3, 0))
"""The versions this package accepts (low inclusive, high exclusive), as in pyproject.toml's pin."""
TESTED_VERSIONS = ("1.1.6", "1.1.7", "1.1.8", "1.2.0")
"""Where the sd-mecha-facing tests ran (1.2.0: the development branch, scripts/test-sd-mecha-versions.sh dev)."""
SD_MECHA_VERSION = tuple(int(p) for p in re.findall(r"\d+", importlib.metadata.version("sd-mecha"))[:3])

HAS_REQ_EXPR_KEYS_MAP = hasattr(_keys_map, "KeysAccessor")
"""1.2.0's keys map (`KeysAccessor`, `ReqExpr`); 1.1.x has `ParamKeysAccessor` / `AllKeysAccessor`."""

_FP8_NAMES = (  # sd-mecha 1.1.8's table (safetensors name, torch attribute)
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
)

HAS_ALLOW_EMPTY_MERGE = "allow_empty_merge" in inspect.signature(sd_mecha.merge).parameters


def patch_fp8_dtype_names() -> None:
    """Give sd-mecha <1.1.8 the fp8 safetensors names 1.1.8 has; idempotent, never replaces an entry."""
    for name, attr in _FP8_NAMES:
        dtype = getattr(torch, attr, None)
        if dtype is not None:
            _streaming.DTYPE_MAPPING.setdefault(name, (dtype, 1))
            _streaming.DTYPE_REVERSE_MAPPING.setdefault(dtype, (name, 1))


def merge_kwargs(**kwargs: Any) -> dict[str, Any]:
    """`sd_mecha.merge` keyword arguments without those the installed sd-mecha lacks."""
    if not HAS_ALLOW_EMPTY_MERGE:
        kwargs.pop("allow_empty_merge", None)
    return kwargs


def is_empty_merge_error(e: BaseException) -> bool:
    """Whether `e` is sd-mecha's error for a recipe that produces no keys (1.1.6: KeyError(<node>))."""
    if isinstance(e, RuntimeError):
        return "produces no output keys" in str(e)
    return isinstance(e, KeyError) and bool(e.args) and isinstance(e.args[0], sd_mecha.RecipeNode)


def version_range_text() -> str:
    """The pin and the tested versions, for messages (e.g. ">=1.1.6,<1.3 (tested on 1.1.6, ...)")."""
    low, high = (".".join(map(str, v)) for v in SD_MECHA_RANGE)
    return f">={low},<{high.removesuffix('.0')} (tested on {', '.join(TESTED_VERSIONS)})"


def key_map_output_config(b: KeyMapBuilder) -> Any:
    """The output model config of a `map_keys` builder (1.1.x: `b.output_config`)."""
    if HAS_REQ_EXPR_KEYS_MAP:
        return getattr(b, "return").config
    return b.output_config


def key_map_params(b: KeyMapBuilder) -> tuple[str, ...]:
    """The parameter names of a `map_keys` builder whose inputs share one config (1.1.x: `b.params`)."""
    if HAS_REQ_EXPR_KEYS_MAP:
        return tuple(b.keys.params)
    return tuple(b.params)


def unlimited_view(state_dict: Any) -> Any:
    """`state_dict` (what sd-mecha passes a merge method) without sd-mecha's per-key read limit,
    listing every key of its model config; `state_dict` itself when it has no limit.

    For a whole-model pre-pass that reads keys it did not declare for the current output key (see
    `mecha.merge_method`): declaring them all costs O(keys^2) in sd-mecha's bookkeeping.
    """
    if hasattr(state_dict, "validate_mm_contract"):  # 1.2.0
        view = copy.copy(state_dict)
        view.validate_mm_contract = False
        view.inputs = state_dict.model_config.keys().keys()  # keys(), `in` and len() list the config
        return view
    if getattr(state_dict, "input_keys_constraints", None) is None:
        return state_dict
    view = copy.copy(state_dict)
    view.input_keys_constraints = None
    return view


patch_fp8_dtype_names()
