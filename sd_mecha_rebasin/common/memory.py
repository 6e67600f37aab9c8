"""Memory habits of matching: per-thread reusable n x n buffers, and freed heap handed back.

Per-thread buffers hold the n x n matrices of matching (up to 5120^2: 100-200 MB each).

A fresh allocation that large is mmapped by glibc and page-faulted in on first touch: building and
converting one SDXL-width cost matrix that way cost ~0.3 s of page faults alone, paid again by every
solve. Each worker thread keeps its buffers instead; they go with the thread (the thread pools of
matching and the warm start end with them).
"""

from __future__ import annotations

import ctypes
import math
import threading

import torch

_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised `shape` tensor, this thread's `name` buffer: valid until its next request."""
    buffers: dict[str, torch.Tensor] = _local.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buffer = buffers.get(name)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        buffers[name] = buffer = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def forget_scratch() -> None:
    """Drop this thread's buffers (a thread that did a pool's work inline, when the work ends)."""
    _local.__dict__.pop("buffers", None)


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only; elsewhere a no-op).

    Worker threads allocate from their own glibc arenas, which keep freed chunks: the warm start's
    features, read in 16 MiB float32 chunks on two threads, left 1.7 GB resident on SD1 until trimmed,
    and the reads, products and model copies of a merge churn through gigabytes the same way.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
