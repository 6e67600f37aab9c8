"""`sd_mecha.merge` at the tests' model sizes.

sd-mecha's safetensors reader gives each open file a share of `total_buffer_size` (256 MiB by
default) and, at every read outside its window, copies the whole window and refills it. Tiny models
are a few MB, so at the default that copying was most of a test merge's time (one tiny-SDXL
MergeMany test: 12 of 43 s). The window does not change what is read; a real-size merge keeps
sd-mecha's default (and the CLI sizes it from its inputs: `mecha.recipes.read_buffer_bytes`).
"""

from __future__ import annotations

from typing import Any

import sd_mecha

TINY_BUFFER_BYTES = 1 << 22


def merge(recipe: Any, **kwargs: Any) -> Any:
    """`sd_mecha.merge(recipe, **kwargs)` with a 4 MiB `total_buffer_size` unless one is given."""
    kwargs.setdefault("total_buffer_size", TINY_BUFFER_BYTES)
    return sd_mecha.merge(recipe, **kwargs)
