"""Progress events from long-running work, for whoever displays them (the CLI's bars, a UI).

The merge method runs inside sd-mecha, which gives it no channel back to the caller; listeners
registered here receive `(event, data)` calls from any thread. A few events per key or per
permutation solved, never per element. Events, in the order a merge emits them:

Phases with a known amount of work (a bar each; its ETA covers that phase only):
- "phase_start": {"phase": str, "total": int, "unit": str}
- "phase": {"phase": str, "done": int, ...}: `done` of `total` so far; "read" adds "bytes" (compact
  copies held, both models).
- "phase_end": {"phase": str}
  The phases: "scan" (jobs.run: NaN/Inf check of A and B, keys of both), "read" (the pre-pass
  reads the keys the permutation rules bind, from both models at once), "start" (weight matching's
  starting point: invariant features of each key, one assignment per permutation, then the
  starting objective of each key; steps), "write" (jobs.run: the output file, bytes, header
  included; it starts once the header is built).

The pre-pass (merge_method.align), around weight matching:
- "prepass_start": {"spaces": int, "max_iter": int}: after "read", before "start". `max_iter` is
  a bound, not a plan: matching usually stops long before it, so no ETA is ever built on it.
- "sweep_start": {"sweep": int, "total": int, "objective": float}: sweep number (from 1); `total`
  permutations it visits (all of them); the objective before it.
- "solve": {"sweep": int, "done": int, "total": int, "objective": float}: permutations visited so
  far in this sweep (one whose neighbours did not change needs no solve and counts at once);
  the objective as of the last finished batch of independent permutations.
- "sweep": {"stats": SweepStats}: the sweep is done.
- "prepass_end": {"result": MatchResult, "seconds": float}

Then sd-mecha streams the output keys (its own key bar, see `progress.Progress.tqdm_factory`).

MergeMany (`many.emit_progress`; sent by the `git_rebasin_many` pre-pass and by `merge-many`):
- "many_model": {"step": ModelStep}: one model aligned to the mean of the others, as soon as its
  result is known (pass, model, permutations and units moved, distance to the mean of the others
  before and after, sweeps, seconds).
- "many_rebuild": {"rebuild": SumRebuild}: a 16-bit running sum is about to be rebuilt.
- "many_pass": {"stats": PassStats}: a pass is done; `stats.unmoved and stats.last`: nothing moved
  at all, so the merge is the weighted mean of the inputs.
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
    """Send `(event, data)` to every listener (in the calling thread)."""
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
