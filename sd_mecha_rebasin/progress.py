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
