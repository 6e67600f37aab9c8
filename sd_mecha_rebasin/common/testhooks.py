"""Pause points for tests: a process stops at a known point, so a test can signal it right there.

A test that kills or interrupts a real process must not guess when the process has reached the
moment it wants to test (a sleep races the process). Instead it sets `SD_REBASIN_TEST_PAUSE` to
`<point>:<fd>` and passes the write end of a pipe as `fd`; when the process reaches `pause(point)`,
it writes `<point> <pid>` and a newline to `fd` and blocks for good, until the test's signal ends it.
The test reads the line (or end-of-file, if the process exited first). Points:
- "importing": the package's import is under way (torch and sd-mecha loaded, the rest not yet),
  in the main thread;
- "merging": the merge has started (output's partial file created), in the merge thread;
- "writing": the output's partial file holds its header and first tensor;
- "written": the output's partial file is complete, not yet renamed into place.

Unset (always, outside tests), `pause` is one environment lookup.
"""

from __future__ import annotations

import os
import threading

ENV = "SD_REBASIN_TEST_PAUSE"


def active() -> bool:
    """Whether a pause point is set (for code that prepares something before `pause`)."""
    return bool(os.environ.get(ENV))


def pause(point: str) -> None:
    """Block for good if `SD_REBASIN_TEST_PAUSE` names `point` (after saying so on its fd)."""
    setting = os.environ.get(ENV)
    if not setting:
        return
    name, _, fd = setting.rpartition(":")
    if name != point or not fd.isdigit():
        return
    os.write(int(fd), f"{point} {os.getpid()}\n".encode())
    threading.Event().wait()
