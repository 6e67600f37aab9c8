"""What differs between the sd-mecha releases this package supports (>=1.1.6,<1.2), in one place.

Imported first by the package, so every layer sees the same sd-mecha whatever its release.

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
"""

import importlib.metadata
import inspect
import re
from typing import Any

import sd_mecha
import torch
from sd_mecha import streaming as _streaming

SD_MECHA_RANGE = ((1, 1, 6), (1, 2, 0))
SD_MECHA_VERSION = tuple(int(p) for p in re.findall(r"\d+", importlib.metadata.version("sd-mecha"))[:3])

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


patch_fp8_dtype_names()
