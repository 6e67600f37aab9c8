"""Several models aligned to one reference, then averaged: mean(REF, pi_1(M1), pi_2(M2), ...).

    python recipes/align_many.py REF M1 M2 [M3 ...] OUT

Each pi_i aligns M_i to REF (one pre-pass per model). This is not the paper's MergeMany, which
aligns every model to the mean of the others, repeatedly.
"""

from __future__ import annotations

from typing import Any

import sd_mecha
from _common import merge, model, parser, rebasin_options

from sd_mecha_rebasin import rebasin


def recipe(ref: Any, *models: Any, **options: Any) -> Any:
    ref = model(ref)
    return sd_mecha.n_average(ref, *(rebasin(model(m), ref, **options) for m in models))


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0], "REF M...").parse_args(argv)
    merge(recipe(args.ref, *args.m, **rebasin_options(args)), args.out, args.dtype)


if __name__ == "__main__":
    main()
