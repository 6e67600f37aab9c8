"""Where weight matching computes its products: on the CPU, or on an accelerator (`--device cuda`).

On an accelerator, each operand chunk is copied to the device, each cost matrix accumulates there
and comes back to the CPU, where the assignment is solved (on the CPU threads, as always).
`product_device(device)` says which path a device takes (`ProductDevice.offload`).

The accelerator path runs without one: `CPU_STAND_IN` is the CPU taking that path, through every
one of its branches (its `.to(device)` copies stay on the CPU), and inside
`cpu_standing_in_for_cuda()` the device "cuda" is that stand-in and counts as one visible GPU
(tests only: the CLI and the merge methods then run their `cuda` path on the CPU). Only CUDA's own
calls stay untested that way; tests marked for CUDA run them where a GPU is.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch


@dataclasses.dataclass(frozen=True)
class ProductDevice:
    """A device for the products, and whether operands are copied to it (`offload`)."""

    device: torch.device
    offload: bool
    """True for an accelerator: operand chunks are copied to `device`, cost matrices accumulate on
    it and are copied back; False for the CPU: no copies, cost matrices in reused CPU buffers."""


CPU_STAND_IN = ProductDevice(torch.device("cpu"), offload=True)
"""The CPU, taking the accelerator's path (tests: the same results as the CPU's path, bit for bit)."""

_stand_in = [False]


@contextlib.contextmanager
def cpu_standing_in_for_cuda() -> Iterator[None]:
    """While open (in every thread), the device "cuda" (any index) is `CPU_STAND_IN` and
    `cuda_devices()` is 1. For tests: it runs the GPU path of the CLI and the merge methods on CPUs."""
    before = _stand_in[0]
    _stand_in[0] = True
    try:
        yield
    finally:
        _stand_in[0] = before


def product_device(device: str | torch.device | ProductDevice) -> ProductDevice:
    """Where products for `device` ("cpu", "cuda", "cuda:1", a `torch.device`) run, and how.

    :raises RuntimeError: `device` is not a torch device name.
    """
    if isinstance(device, ProductDevice):
        return device
    device = torch.device(device)
    if device.type == "cpu":
        return ProductDevice(device, offload=False)
    if device.type == "cuda" and _stand_in[0]:
        return CPU_STAND_IN
    return ProductDevice(device, offload=True)


def cuda_devices() -> int:
    """GPUs torch can use here (0 without CUDA; 1 inside `cpu_standing_in_for_cuda`)."""
    if _stand_in[0]:
        return 1
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
