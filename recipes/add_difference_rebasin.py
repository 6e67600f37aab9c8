"""Add-difference across basins: pi(A) + alpha * (B - C), where pi aligns A to C.

    python recipes/add_difference_rebasin.py A B C OUT [--alpha 1.0]

The task vector B - C (B fine-tuned from C) is written in C's unit order. A, from another basin,
is aligned to C first, so that the difference lands on the units it was learned for; pi(A)
computes the same function as A.
"""

from __future__ import annotations

from typing import Any

from _common import merge, model, parser, rebasin_options
from sd_mecha.extensions import merge_methods

from sd_mecha_rebasin import rebasin

# The registered method: sd-mecha 1.1.8's `sd_mecha.add_difference` wrapper fails on merge nodes.
add_difference = merge_methods.resolve("add_difference")


def recipe(a: Any, b: Any, c: Any, alpha: float = 1.0, **options: Any) -> Any:
    a, b, c = model(a), model(b), model(c)
    return add_difference(rebasin(a, c, **options), b - c, alpha=alpha)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], "A B C")
    p.add_argument("--alpha", type=float, default=1.0, help="scale of B - C (default 1.0)")
    args = p.parse_args(argv)
    merge(recipe(args.a, args.b, args.c, args.alpha, **rebasin_options(args)), args.out, args.dtype)


if __name__ == "__main__":
    main()
