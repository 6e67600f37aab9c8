"""Progress events from long-running work, for whoever displays them (the CLI's bars, a UI).

The merge method runs inside sd-mecha, which gives it no channel back to the caller; listeners
registered here receive `(event, data)` calls from any thread. Events:
- "prepass_start": {"spaces": int, "max_iter": int}
- "sweep": {"stats": SweepStats}
- "prepass_end": {"result": MatchResult, "seconds": float}
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

Listener = Callable[[str, dict[str, Any]], None]

_listeners: list[Listener] = []
_lock = threading.Lock()


def emit(event: str, **data: Any) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(event, data)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Receive events while the block runs."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)
