"""What a person watching the command line sees: progress bars and one-line warnings.

The jobs in `jobs.py` and the merge method report through `events` (from any thread) and
sd-mecha's key bar; this module turns both into tqdm bars on stderr, and sd-mecha's log warnings
into `sd-rebasin: warning:` lines.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from ..common.launch import PROG

PHASE_LABELS = {
    "scan": "checking A and B for NaN/Inf",
    "read": "re-basin: reading A and B",
    "start": "re-basin: starting point",
    "write": "writing the output",
}


class Progress:
    """What a merge shows while it works, driven by `events` (see `events.py`) and sd-mecha's key bar.

    One bar per phase whose amount of work is known: the NaN/Inf scan, the pre-pass read, the
    starting point of weight matching, each sweep (permutations visited out of all, with the
    objective so far), sd-mecha's keys, the write. Each bar's ETA covers its own phase only: no
    bar counts sweeps, so `max_iter` never enters an estimate. sd-mecha runs the pre-pass inside
    its first key, while its own key bar is already open; the key bar is therefore held back (its
    count kept) until the pre-pass has ended. `file`: where the bars go (stderr by default).
    """

    def __init__(self, enabled: bool, expect_prepass: bool, file: TextIO | None = None):
        self.enabled = enabled
        self.file = file
        self.lock = threading.RLock()
        self.prepass_running = expect_prepass
        self.phase_bar = None
        self.phase: str | None = None
        self.sweep_bar = None
        self.key_bar = None
        self.key_total: int | None = None
        self.key_done = 0
        self.result = None
        self.prepass_seconds = 0.0
        self._last_objective: float | None = None

    def _bar(self, **kwargs: Any) -> Any:
        from tqdm import tqdm

        return tqdm(dynamic_ncols=True, file=self.file or sys.stderr, **kwargs)

    # events from sd_mecha_rebasin.events
    def __call__(self, event: str, data: Mapping[str, Any]) -> None:
        with self.lock:
            handler = getattr(self, f"_on_{event}", None)
            if handler is not None:
                handler(data)

    def _on_phase_start(self, data: Mapping[str, Any]) -> None:
        self._close_phase()
        self.phase = data["phase"]
        if self.enabled:
            in_bytes = data.get("unit") == "B"
            self.phase_bar = self._bar(
                total=data.get("total") or None,
                desc=PHASE_LABELS.get(self.phase, self.phase),
                unit=data.get("unit") or "it",
                unit_scale=in_bytes,
                unit_divisor=1024 if in_bytes else 1000,
            )

    def _on_phase(self, data: Mapping[str, Any]) -> None:
        bar = self.phase_bar
        if bar is None or data.get("phase") != self.phase:
            return
        if data.get("total") and data["total"] != bar.total:
            bar.total = data["total"]
        if "bytes" in data:
            bar.set_postfix_str(f"{data['bytes'] / 2**30:.2f} GiB held", refresh=False)
        bar.update(int(data["done"]) - bar.n)

    def _on_phase_end(self, data: Mapping[str, Any]) -> None:
        if data.get("phase") == self.phase:
            self._close_phase()

    def _on_prepass_start(self, data: Mapping[str, Any]) -> None:
        self.prepass_running = True

    def _on_sweep_start(self, data: Mapping[str, Any]) -> None:
        self._close_phase()
        self._close_sweep()
        self._last_objective = float(data["objective"])
        if self.enabled:
            self.sweep_bar = self._bar(
                total=int(data["total"]), desc=f"re-basin sweep {data['sweep']}", unit="perm"
            )
            self.sweep_bar.set_postfix_str(f"objective {self._last_objective:.6g}", refresh=False)

    def _on_solve(self, data: Mapping[str, Any]) -> None:
        bar = self.sweep_bar
        if bar is not None:
            bar.set_postfix_str(f"objective {float(data['objective']):.6g}", refresh=False)
            bar.update(int(data["done"]) - bar.n)

    def _on_sweep(self, data: Mapping[str, Any]) -> None:
        stats = data["stats"]
        bar = self.sweep_bar
        if bar is not None:
            delta = (
                "" if self._last_objective is None else f" ({stats.objective - self._last_objective:+.4g})"
            )
            bar.set_postfix_str(
                f"objective {stats.objective:.6g}{delta}, {stats.changed} changed, distance {stats.rel_distance:.4f}",
                refresh=False,
            )
            if bar.total:
                bar.update(bar.total - bar.n)
            self._close_sweep()
        self._last_objective = stats.objective

    def _on_prepass_end(self, data: Mapping[str, Any]) -> None:
        self.result = data.get("result")
        self.prepass_seconds = float(data.get("seconds") or 0.0)
        self.prepass_running = False
        self._close_phase()
        self._close_sweep()
        self._show_keys()

    def _close_phase(self) -> None:
        if self.phase_bar is not None:
            self.phase_bar.close()
        self.phase_bar = None
        self.phase = None

    def _close_sweep(self) -> None:
        if self.sweep_bar is not None:
            self.sweep_bar.close()
        self.sweep_bar = None

    def _show_keys(self) -> None:
        if self.enabled and self.key_bar is None and self.key_total is not None and not self.prepass_running:
            self.key_bar = self._bar(total=self.key_total, desc="keys", unit="key", initial=self.key_done)

    def tqdm_factory(self) -> type:
        """A stand-in for tqdm that sd-mecha's `merge(tqdm=...)` uses for its key bar."""
        progress = self

        class KeyBar:
            def __init__(self, *args: Any, total: int | None = None, **kwargs: Any):
                with progress.lock:
                    progress.key_total = total
                    progress.key_done = 0
                    progress._show_keys()

            def __enter__(self) -> KeyBar:
                return self

            def __exit__(self, *exc: Any) -> None:
                self.close()

            def set_postfix(self, *args: Any, **kwargs: Any) -> None:
                pass

            def update(self, n: int = 1) -> None:
                with progress.lock:
                    progress.key_done += n
                    if progress.key_bar is not None:
                        progress.key_bar.update(n)

            def close(self) -> None:
                with progress.lock:
                    if progress.key_bar is not None:
                        progress.key_bar.close()
                        progress.key_bar = None

        return KeyBar

    def close(self) -> None:
        """Close every open bar (the object stays usable: a later phase opens a new one)."""
        with self.lock:
            self._close_phase()
            self._close_sweep()
            if self.key_bar is not None:
                self.key_bar.close()
            self.key_bar = None


class _LogToStderr(logging.Handler):
    """sd-mecha's warnings as one-line `sd-rebasin: warning:` messages (above any progress bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage().strip().splitlines()
            line = text[0] if text else ""
        except Exception:  # noqa: BLE001 - a broken log record must not stop a merge
            return
        warn(line)


class WarningLog:
    """The warnings of one command, for its `--json` object; `echo`: whether they also go to stderr."""

    def __init__(self, echo: bool):
        self.echo = echo
        self.messages: list[str] = []


_logs: list[WarningLog] = []
"""Every `recording_warnings` now open, process-wide: warnings come from worker threads too."""
_logs_lock = threading.Lock()


@contextlib.contextmanager
def recording_warnings(echo: bool = True) -> Iterator[list[str]]:
    """Collect every `warn` message while open (the list it yields fills as they come).

    `echo=False` keeps them off stderr (`--json --quiet`: the JSON object still lists them).
    Outside any recording, `warn` only prints.
    """
    log = WarningLog(echo)
    with _logs_lock:
        _logs.append(log)
    try:
        yield log.messages
    finally:
        with _logs_lock:
            _logs.remove(log)


def warn(message: str) -> None:
    """`sd-rebasin: warning: <message>` on stderr (above any progress bar), and into every open
    `recording_warnings` log."""
    with _logs_lock:
        logs = list(_logs)
        for log in logs:
            log.messages.append(message)
    if all(log.echo for log in logs):
        from tqdm import tqdm

        tqdm.write(f"{PROG}: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def capture_logging(quiet: bool) -> Iterator[None]:
    root = logging.getLogger()
    handler: logging.Handler = logging.NullHandler() if quiet else _LogToStderr(logging.WARNING)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


class ManyProgress:
    """Merge-many progress on stderr: one line per model aligned (pass k, model i of N, its gain,
    permutations changed, ETA of the pass), one per pass, then a bar over the output pass's keys.

    Called with `many.ModelStep` / `many.SumRebuild` / `many.PassStats`; `forward` also receives them (library users).
    """

    def __init__(self, names: list[str], enabled: bool, forward: Any = None):
        self.names = names
        self.enabled = enabled
        self.forward = forward
        self.pass_seconds = 0.0
        self.bar = None

    def _line(self, text: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)

    def __call__(self, item: Any) -> None:
        if self.forward is not None:
            self.forward(item)
        if hasattr(item, "position"):  # a ModelStep
            if item.position == 1:
                self.pass_seconds = 0.0
            self.pass_seconds += item.seconds
            self._line(many_step_line(item, self.names, self.pass_seconds))
        elif hasattr(item, "objective"):  # a PassStats
            self._line(many_pass_line(item))
        else:  # a SumRebuild
            self._line(
                f"pass {item.pass_index}: rebuilding the running sum from the {item.models} models "
                "(one read of each, summed in float32)"
            )

    def output_pass(self, keys: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=keys, desc="weighted mean", unit="key", file=sys.stderr, leave=False)

    def key_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def many_step_line(item: Any, names: list[str], pass_seconds: float | None = None) -> str:
    """One model's result (`many.ModelStep`) in one line; `pass_seconds` (the pass so far) adds its ETA."""
    left = item.visits - item.position
    eta = (
        f"; pass ETA {_duration(pass_seconds / item.position * left)}"
        if left and pass_seconds is not None
        else ""
    )
    if item.changed:
        moved = f"{item.changed} permutation(s), {item.units_moved} of {item.units} units moved"
    else:
        moved = "nothing moved"
    zero = " (weight 0: changes no target)" if item.zero_weight else ""
    return (
        f"pass {item.pass_index}, model {item.model + 1} of {len(names)} ({names[item.model]}{zero}; "
        f"{item.position} of {item.visits} to align in this pass): {moved}; "
        f"distance to the mean of the others {item.distance_before:.6g} -> {item.distance:.6g} "
        f"(gain {item.gain:+.6g}); {item.sweeps} sweep(s), {decided_text(item)}{item.seconds:.1f} s{eta}"
    )


def decided_text(item: Any) -> str:
    """How the alignment's spaces were decided (the identity certificate), or "" when all were searched."""
    proved = item.certified + item.exact_rows
    if not proved:
        return ""
    rows = f" ({item.exact_rows} with exact rows)" if item.exact_rows else ""
    return f"{proved} space(s) proved unmoved{rows}, {item.searched} searched, "


def many_pass_line(item: Any) -> str:
    """One pass (`many.PassStats`) in one line; says plainly when the merge is the inputs' weighted mean."""
    rebuilt = f" (running sum rebuilt in {item.rebuild_seconds:.1f} s)" if item.rebuild_seconds else ""
    if item.centre_seconds:
        rebuilt += f" (certificate centre {item.centre_seconds:.1f} s)"
    line = (
        f"pass {item.pass_index} done: {item.models_changed} of {item.aligned} model(s) moved, "
        f"objective {item.objective:.8g}, mean distance {item.mean_distance:.6g}, {item.seconds:.1f} s{rebuilt}"
    )
    if item.unmoved and item.last:
        line += "; nothing moved: the merge equals the weighted mean of the inputs"
    elif item.unmoved:
        line += "; nothing moved yet (every model in its own basis); the next pass checks the models against the others"
    return line


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
