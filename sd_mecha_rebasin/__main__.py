"""`python -m sd_mecha_rebasin` runs the `sd-rebasin` command line."""

import sys

from .cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
