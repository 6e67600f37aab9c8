"""Known defects of real checkpoints that the output must not inherit: CLIP `position_ids`.

CLIP text encoders (SD1 `cond_stage_model.transformer.text_model.`, SDXL
`conditioner.embedders.0.transformer.text_model.`) carry `embeddings.position_ids`, an int64
[1, 77] buffer holding 0..76 that indexes the position embedding. Many checkpoints lack it (strict
loaders then fail), and older merge tools interpolated it into floats (0, 0.583, 1.166, ...), which
silently shifts every token's position. The values are fixed by the architecture, so the output
always holds the exact buffer; it is never interpolated or merged.
"""

from __future__ import annotations

import functools
from collections.abc import MutableMapping

import torch

POSITION_IDS_SUFFIX = "embeddings.position_ids"


@functools.cache
def position_ids_keys(config: str) -> dict[str, tuple[int, ...]]:
    """Config key -> shape of every text encoder's `position_ids` in an sd-mecha config."""
    from .. import model_configs

    return {
        key: tuple(meta.shape)
        for key, meta in model_configs.resolve(config).keys().items()
        if key.endswith(POSITION_IDS_SUFFIX)
    }


def exact_position_ids(shape: tuple[int, ...]) -> torch.Tensor:
    """int64 0..n-1 in `shape` (n = the number of elements; [1, 77] for CLIP)."""
    n = 1
    for d in shape:
        n *= d
    return torch.arange(n, dtype=torch.int64).reshape(shape)


def _describe(tensor: torch.Tensor) -> str:
    values = ", ".join(f"{v:.4g}" for v in tensor.reshape(-1)[:4].double().tolist())
    dtype = str(tensor.dtype).removeprefix("torch.")
    return f"{dtype} {list(tensor.shape)} ({values}, ...)"


def repair_position_ids(config: str, tensors: MutableMapping[str, torch.Tensor]) -> list[str]:
    """Put the exact `position_ids` into `tensors` (config key names) for every text encoder present.

    A text encoder counts as present when any other key under its prefix is in `tensors`. A missing
    buffer is added (at the end), a wrong one (another dtype, shape or value) replaced; its length is
    the position embedding's row count (77, or LongCLIP's 248). Returns one
    phrase per change (empty: nothing to repair), e.g. "position_ids missing (added)".
    """
    notes = []
    for key, shape in position_ids_keys(config).items():
        prefix = key[: -len(POSITION_IDS_SUFFIX)]
        if not any(k.startswith(prefix) and k != key for k in tensors):
            continue
        embedding = tensors.get(key[: -len("position_ids")] + "position_embedding.weight")
        if embedding is not None and embedding.dim() == 2:  # LongCLIP: 248 positions, not 77
            shape = (1, int(embedding.shape[0]))
        want = exact_position_ids(shape)
        have = tensors.get(key)
        if have is None:
            notes.append(f"{key} missing (added)")
        elif have.dtype == want.dtype and have.shape == want.shape and torch.equal(have, want):
            continue
        else:
            notes.append(f"{key} was {_describe(have)}, not int64 0..{want.numel() - 1} (replaced)")
        tensors[key] = want
    return notes
