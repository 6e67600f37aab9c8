"""Entry point of the `sd-rebasin` console script (not an API: use `sd_mecha_rebasin`).

It lives outside the package so that the script's first import is light: the package's import
takes seconds (torch, sd-mecha), and Ctrl-C during it ends in one line and exit code 130 only when
the package sees this module loaded first (`sd_mecha_rebasin/common/launch.py`).
"""

import sys


def main() -> int:
    """Run `sd-rebasin` with `sys.argv`; returns its exit code."""
    from sd_mecha_rebasin.cli.commands import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
