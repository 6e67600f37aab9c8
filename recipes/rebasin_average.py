"""Re-basin average: (1 - alpha) * A + alpha * pi(B), where pi aligns B to A.

    python recipes/rebasin_average.py A B OUT [--alpha 0.5]

pi(B) computes the same function as B, with its hidden units reordered to match A's, so the
average combines like units instead of unrelated ones.
"""

from __future__ import annotations

from typing import Any

import sd_mecha
from _common import merge, model, parser, rebasin_options

from sd_mecha_rebasin import rebasin


def recipe(a: Any, b: Any, alpha: float = 0.5, **options: Any) -> Any:
    """`b` aligned to `a`, then averaged with it; `alpha` is the weight of `b`."""
    a = model(a)
    return sd_mecha.weighted_sum(a, rebasin(model(b), a, **options), alpha=alpha)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], "A B")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of B (default 0.5)")
    args = p.parse_args(argv)
    merge(recipe(args.a, args.b, args.alpha, **rebasin_options(args)), args.out, args.dtype)


if __name__ == "__main__":
    main()
