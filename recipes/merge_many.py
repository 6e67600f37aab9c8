"""MergeMany (Git Re-Basin, Algorithm 3): sum_i w_i pi_i(M_i), every model re-based into M1's basis.

    python recipes/merge_many.py M1 M2 [M3 ...] OUT [--weights 1,1,1] [--ref 0]

Each model is aligned to the weighted mean of the others, pass after pass, until no model moves
(`git_rebasin_many`); the output lives in the reference's basis (M1 unless --ref says otherwise).
`sd-rebasin merge-many` runs the same loop with file checks and metadata.
"""

from __future__ import annotations

from typing import Any

from _common import merge, model, parser, rebasin_options

from sd_mecha_rebasin import rebasin_many


def recipe(*models: Any, weights: str = "", ref: int = 0, **options: Any) -> Any:
    """`weights`: "w1,...,wN" (empty: equal); `ref`: index of the model whose basis the output keeps."""
    return rebasin_many(*(model(m) for m in models), weights=weights, ref=ref, **options)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], "M...")
    p.add_argument("--weights", default="", help="w1,...,wN (default: equal)")
    p.add_argument("--ref", type=int, default=0, help="index of the reference model (default 0: M1)")
    args = p.parse_args(argv)
    merge(recipe(*args.m, weights=args.weights, ref=args.ref, **rebasin_options(args)), args.out, args.dtype)


if __name__ == "__main__":
    main()
