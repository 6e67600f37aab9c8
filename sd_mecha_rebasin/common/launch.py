"""Ctrl-C while the command line starts: one line and exit code 130, not a traceback.

Importing the package takes seconds (torch, sd-mecha); a SIGINT then would raise KeyboardInterrupt
inside some library's import and print its traceback. When this process is the `sd-rebasin`
command line, the package's `__init__` calls `guard_start()` before any heavy import, and until
the command's own handling begins (`end_start_guard()`, once the package is imported) SIGINT
prints `sd-rebasin: error: interrupted; no output written` (with `--json`, also the failure object
on stdout) and exits with code 130 at once: nothing has been written yet. A program that imports
the package keeps Python's KeyboardInterrupt.

The process is the command line when it was started
- by the console script: its entry module `ENTRY_MODULE` lives outside the package (so that the
  script's first import is light) and is loaded before the package, or
- as `python -m sd_mecha_rebasin`: Python imports the package while `sys.argv[0]` is "-m" (its
  documented behaviour while it locates the module), and `sys.orig_argv` names the module.

The console script also defers the package's heavy import: its `main` sets `DEFER_IMPORT` in the
entry module, the package's `__init__` then stops after the guard (`import_deferred`), and the
command that runs finishes the import (`finish_import`). So `sd-rebasin --help` and usage errors
need neither torch nor sd-mecha, and Ctrl-C during the deferred import is still guarded.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

PROG = "sd-rebasin"
PACKAGE = "sd_mecha_rebasin"
ENTRY_MODULE = "sd_rebasin_cli"
"""The console script's entry module (pyproject's `[project.scripts]`), at the top level."""
INTERRUPTED = "interrupted; no output written"
DEFER_IMPORT = "DEFER_IMPORT"
"""The entry module's flag: true while the package's heavy import waits for a command."""


def is_command_line() -> bool:
    """Whether this process was started as the `sd-rebasin` command line (see the module docstring)."""
    if ENTRY_MODULE in sys.modules:
        return True
    return sys.argv[:1] == ["-m"] and _module_option(getattr(sys, "orig_argv", [])).split(".")[0] == PACKAGE


def _module_option(argv: Sequence[str]) -> str:
    """The module of the interpreter's `-m` option in `argv` ("" without one)."""
    for i, arg in enumerate(argv[1:], 1):
        if arg == "-m":
            return argv[i + 1] if i + 1 < len(argv) else ""
        if arg.startswith("-m"):
            return arg[2:]
    return ""


def json_requested(args: Sequence[str]) -> bool:
    """`--json` among the command-line arguments `args` (before a `--`)."""
    args = list(args)
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def guard_start() -> None:
    """From here until `end_start_guard()`, Ctrl-C ends the command line with one line and code 130.

    Only in the command line's own process, in its main thread, and only where SIGINT has
    Python's default handler (it stays ignored in a background job that inherited SIG_IGN).
    """
    if threading.current_thread() is not threading.main_thread() or not is_command_line():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def import_deferred() -> bool:
    """Whether the package's `__init__` should stop after the start guard (see the module docstring)."""
    return bool(getattr(sys.modules.get(ENTRY_MODULE), DEFER_IMPORT, False))


def finish_import() -> None:
    """Run the rest of a deferred package import (torch, sd-mecha, the registrations: the package's
    `__init__` again, now in full), then end the start guard. Without a deferred import: only the latter."""
    entry = sys.modules.get(ENTRY_MODULE)
    if getattr(entry, DEFER_IMPORT, False):
        setattr(entry, DEFER_IMPORT, False)
        importlib.reload(sys.modules[PACKAGE])
    end_start_guard()


def end_start_guard() -> None:
    """Give SIGINT back to Python's KeyboardInterrupt (the running command removes its partial files)."""
    with contextlib.suppress(ValueError):  # not the main thread (embedded use)
        if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _interrupted_while_starting(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the exit
    with contextlib.suppress(OSError):
        os.write(2, f"{PROG}: error: {INTERRUPTED}\n".encode())
        args = sys.argv[1:]
        if json_requested(args):
            command = next((a for a in args if not a.startswith("-")), None)
            failure = {"command": command, "error": INTERRUPTED, "exit_code": 130, "warnings": []}
            os.write(1, (json.dumps(failure) + "\n").encode())
    os._exit(130)
