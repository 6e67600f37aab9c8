"""What a person watching the command line sees: progress bars and one-line warnings.

The jobs in `jobs.py` report through `events` (from any thread) and sd-mecha's key bar; this module
turns both into tqdm bars on stderr, and sd-mecha's log warnings into `sd-rebasin: warning:` lines.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

PROG = "sd-rebasin"


class Progress:
    """The pre-pass bar (one step per sweep) and sd-mecha's key bar, shown one after the other.

    sd-mecha runs the pre-pass inside its first key, while its own key bar is already open; the
    key bar is therefore held back (its count kept) until the pre-pass has ended.
    """

    def __init__(self, enabled: bool, expect_prepass: bool):
        self.enabled = enabled
        self.lock = threading.RLock()
        self.prepass_running = expect_prepass
        self.prepass_bar = None
        self.key_bar = None
        self.key_total: int | None = None
        self.key_done = 0
        self.result = None
        self.prepass_seconds = 0.0
        self._last_objective: float | None = None

    # events from sd_mecha_rebasin.events
    def __call__(self, event: str, data: Mapping[str, Any]) -> None:
        with self.lock:
            if event == "prepass_start":
                self.prepass_running = True
                if self.enabled:
                    from tqdm import tqdm

                    self.prepass_bar = tqdm(
                        total=int(data.get("max_iter") or 0) or None,
                        desc=f"{data.get('spaces', '?')} permutations",
                        unit="sweep",
                        dynamic_ncols=True,
                        bar_format="re-basin sweep {n_fmt}/{total_fmt} |{bar:12}| {desc} [{elapsed}<{remaining}]",
                    )
            elif event == "sweep":
                stats = data["stats"]
                if self.prepass_bar is not None:
                    delta = (
                        ""
                        if self._last_objective is None
                        else f" ({stats.objective - self._last_objective:+.4g})"
                    )
                    self.prepass_bar.set_description_str(
                        f"objective {stats.objective:.6g}{delta}, {stats.changed} changed, "
                        f"distance {stats.rel_distance:.4f}",
                        refresh=False,
                    )
                    self.prepass_bar.update(1)
                self._last_objective = stats.objective
            elif event == "prepass_end":
                self.result = data.get("result")
                self.prepass_seconds = float(data.get("seconds") or 0.0)
                self.prepass_running = False
                if self.prepass_bar is not None:
                    self.prepass_bar.close()
                    self.prepass_bar = None
                self._show_keys()

    def _show_keys(self) -> None:
        if self.enabled and self.key_bar is None and self.key_total is not None and not self.prepass_running:
            from tqdm import tqdm

            self.key_bar = tqdm(
                total=self.key_total, desc="keys", unit="key", dynamic_ncols=True, initial=self.key_done
            )

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
        with self.lock:
            for bar in (self.prepass_bar, self.key_bar):
                if bar is not None:
                    bar.close()
            self.prepass_bar = self.key_bar = None


class _LogToStderr(logging.Handler):
    """sd-mecha's warnings as one-line `sd-rebasin: warning:` messages (above any progress bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage().strip().splitlines()
            line = text[0] if text else ""
        except Exception:  # noqa: BLE001 - a broken log record must not stop a merge
            return
        warn(line)


def warn(message: str) -> None:
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

    Called with `many.ModelStep` / `many.PassStats`; `forward` also receives them (library users).
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
            left = item.visits - item.position
            eta = f"; pass ETA {_duration(self.pass_seconds / item.position * left)}" if left else ""
            self._line(
                f"pass {item.pass_index}, model {item.model + 1} of {len(self.names)} ({self.names[item.model]}; "
                f"{item.position} of {item.visits} to align in this pass): "
                f"gain {item.gain:+.6g}, {item.changed} permutation(s) changed, {item.sweeps} sweep(s), "
                f"distance to the others {item.distance:.6g}, {item.seconds:.1f} s{eta}"
            )
        else:  # a PassStats
            self._line(
                f"pass {item.pass_index} done: {item.models_changed} of {item.aligned} model(s) moved, "
                f"objective {item.objective:.8g}, mean distance {item.mean_distance:.6g}, {item.seconds:.1f} s"
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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
