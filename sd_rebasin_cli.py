"""Entry point of the `sd-rebasin` console script (not an API: use `sd_mecha_rebasin`).

It lives outside the package so that the script's first import is light: the package's import
takes seconds (torch, sd-mecha), and Ctrl-C during it ends in one line and exit code 130 only when
the package sees this module loaded first (`sd_mecha_rebasin/common/launch.py`). `DEFER_IMPORT`
tells the package to leave its heavy import to the command that runs: `--help` and usage errors
then need neither torch nor sd-mecha.
"""

import sys

DEFER_IMPORT = False
"""Set by `main`: the package's `__init__` stops after the Ctrl-C guard until a command runs."""


def main() -> int:
    """Run `sd-rebasin` with `sys.argv`; returns its exit code."""
    global DEFER_IMPORT
    DEFER_IMPORT = "sd_mecha_rebasin" not in sys.modules  # a program that already imported it has it all
    from sd_mecha_rebasin.cli.commands import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
