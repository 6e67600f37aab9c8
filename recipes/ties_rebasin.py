"""TIES merging of re-based task vectors: BASE + alpha * ties_sum(pi_1(M1) - BASE, pi_2(M2) - BASE, ...).

    python recipes/ties_rebasin.py BASE M1 M2 [M3 ...] OUT [--k 0.2] [--alpha 1.0]

Each model is aligned to BASE before its task vector is taken, so that TIES' top-k trimming and
sign election compare the same units across models.
"""

from __future__ import annotations

from typing import Any

import sd_mecha
from _common import merge, model, parser, rebasin_options
from sd_mecha.extensions import merge_methods

from sd_mecha_rebasin import rebasin

# The registered method: sd-mecha 1.1.8's `sd_mecha.add_difference` wrapper fails on merge nodes.
add_difference = merge_methods.resolve("add_difference")


def recipe(base: Any, *models: Any, k: float = 0.2, alpha: float = 1.0, **options: Any) -> Any:
    """`k`: fraction of each task vector TIES keeps (largest magnitudes); `alpha`: scale of the sum."""
    base = model(base)
    deltas = [rebasin(model(m), base, **options) - base for m in models]
    return add_difference(base, sd_mecha.ties_sum(*deltas, k=k), alpha=alpha)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], "BASE M...")
    p.add_argument("--k", type=float, default=0.2, help="fraction of each task vector kept (default 0.2)")
    p.add_argument("--alpha", type=float, default=1.0, help="scale of the merged task vector (default 1.0)")
    args = p.parse_args(argv)
    merge(
        recipe(args.base, *args.m, k=args.k, alpha=args.alpha, **rebasin_options(args)), args.out, args.dtype
    )


if __name__ == "__main__":
    main()
