"""ComfyUI's progress bar driven by the package's progress events (`common.events`).

One bar at a time on the running node: each phase with a known amount of work ("read": keys of
both models, "start": weight matching's starting point), then one per weight-matching sweep
(permutations visited of all). ComfyUI's hook also raises its interrupt exception when the user
cancels, which stops the matching between two permutations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

BarFactory = Callable[[int], Any]
"""`total -> bar` with `update_absolute(value, total)`: `comfy.utils.ProgressBar`."""


def comfy_bar(total: int) -> Any:
    import comfy.utils

    return comfy.utils.ProgressBar(total)


class EventBar:
    """An `events` listener showing the phases and sweeps of an alignment on a ComfyUI bar."""

    def __init__(self, factory: BarFactory = comfy_bar):
        self.factory = factory
        self.bar: Any = None

    def _new(self, total: int) -> None:
        self.bar = self.factory(max(1, int(total)))

    def __call__(self, event: str, data: Mapping[str, Any]) -> None:
        if event == "phase_start" and data.get("total"):
            self._new(data["total"])
        elif event == "sweep_start":
            self._new(data["total"])
        elif event in ("phase", "solve") and self.bar is not None:
            self.bar.update_absolute(int(data["done"]))


class StepBar:
    """MergeMany's `on_progress` as a ComfyUI bar: one per pass, models aligned of those to visit."""

    def __init__(self, factory: BarFactory = comfy_bar):
        self.factory = factory
        self.bar: Any = None
        self.pass_index: int | None = None

    def __call__(self, item: Any) -> None:
        if not hasattr(item, "position"):  # a PassStats or SumRebuild: no bar of its own
            return
        if item.pass_index != self.pass_index or self.bar is None:
            self.pass_index = item.pass_index
            self.bar = self.factory(max(1, int(item.visits)))
        self.bar.update_absolute(int(item.position), int(item.visits))
