"""Run the real command line in a child process that stops at a known point, for signal tests.

The child reaches `sd_mecha_rebasin.common.testhooks.pause(point)`, says so through a pipe and blocks:
the test then signals a process that is, by construction, exactly there. No sleep, no polling.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
HANG_GUARD_SECONDS = 1800
"""Kills a child that never reaches its point (a hang, not a slow machine: the tiny merges
take seconds); the test then fails with the child's output instead of blocking CI forever."""


MODULE = ["-m", "sd_mecha_rebasin"]
"""`python -m sd_mecha_rebasin`: one way to start the command line."""


def console_script() -> list[str]:
    """What the installed `sd-rebasin` script runs, as python arguments: it imports the entry point
    that pyproject's `[project.scripts]` names and calls it (as pip's generated script does)."""
    import tomllib

    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["sd-rebasin"]
    module, _, function = entry.partition(":")
    return ["-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def start_paused(
    point: str, args: list[str], cwd: pathlib.Path, log: pathlib.Path, entry: list[str] = MODULE
) -> tuple[subprocess.Popen, str]:
    """Start the command line (`python <entry> args`: `MODULE` or `console_script()`) and return it
    once it is paused at `point`, with the line it wrote (`"<point> <pid>\\n"`). Its stdout and
    stderr go to `log`."""
    read_end, write_end = os.pipe()
    env = os.environ | {
        "SD_REBASIN_TEST_PAUSE": f"{point}:{write_end}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, *entry, *args],
            cwd=cwd,
            env=env,
            pass_fds=(write_end,),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # A test run started in the background of a non-interactive shell (`pytest &`) inherits
            # SIGINT ignored, and so would the child: Ctrl-C as a terminal delivers it must work.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    os.close(write_end)  # the child holds the only write end: end-of-file if it exits first
    guard = threading.Timer(HANG_GUARD_SECONDS, proc.kill)
    guard.start()
    try:
        with os.fdopen(read_end, "r") as pipe:
            line = pipe.readline()
    finally:
        guard.cancel()
    if not line:
        proc.wait()
        pytest.fail(f"sd-rebasin ended (rc {proc.returncode}) before reaching {point}: {log.read_text()}")
    return proc, line
