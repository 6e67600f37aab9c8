"""TIES over MergeMany-re-based task vectors: BASE + alpha * ties_sum(pi_i(M_i) - BASE, ...).

    python recipes/ties_many.py BASE M1 M2 [M3 ...] OUT [--k 0.2] [--alpha 1.0]

BASE and the models go through one MergeMany (`git_rebasin_many`, BASE the reference); each
`member=i` node is model i re-based into BASE's basis, so TIES' trimming and sign election compare
the same units. The member nodes share one pre-pass.
"""

from __future__ import annotations

from typing import Any

import sd_mecha
from _common import merge, model, parser, rebasin_options
from sd_mecha.extensions import merge_methods

from sd_mecha_rebasin import rebasin_many

# The registered method: sd-mecha 1.1.8's `sd_mecha.add_difference` wrapper fails on merge nodes.
add_difference = merge_methods.resolve("add_difference")


def recipe(base: Any, *models: Any, k: float = 0.2, alpha: float = 1.0, **options: Any) -> Any:
    """`k`: fraction of each task vector TIES keeps (largest magnitudes); `alpha`: scale of the sum."""
    nodes = [model(base), *(model(m) for m in models)]
    rebased = [rebasin_many(*nodes, ref=0, member=i, **options) for i in range(1, len(nodes))]
    return add_difference(nodes[0], sd_mecha.ties_sum(*(r - nodes[0] for r in rebased), k=k), alpha=alpha)


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
