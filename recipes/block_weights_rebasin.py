"""Block-weighted re-basin average (MBW): (1 - alpha[block]) * A + alpha[block] * pi(B).

    python recipes/block_weights_rebasin.py A B OUT [--alpha "0,0,...,1"] [--alpha-default 0.5]

pi aligns B to A (Git Re-Basin, `git_rebasin`); alpha, B's weight, is one number per UNet block
in supermerger's order, turned into one value per key by sd-mecha's own block configs and
conversions (`sd1-supermerger_blocks` -> `sd1-ldm` and, from this package, `sd2-ldm`;
`sdxl-supermerger_blocks` -> `sdxl-sgm`):

- SD1 and SD2, 26 numbers: BASE, IN00..IN11, M00, OUT00..OUT11
- SDXL, 20 numbers: BASE, IN00..IN08, M00, OUT00..OUT08 (sd-mecha's VAE entry follows BASE)

or `BLOCK=value` pairs with the rest from `default=` / `--alpha-default` (`IN04=1,default=0`).
BASE covers the text encoder(s) and the time embedding (and the SD1/SD2 VAE). The default,
`OUTER_TO_B`, keeps A in BASE and the input blocks, averages the middle block, and takes pi(B) in
the output blocks (composition from A, detail from B).

In Python, the same through sd-mecha directly:

    blocks = {"BASE": 0.0, "IN00": 0.0, ..., "OUT11": 1.0}      # every entry of the block config
    alpha = sd_mecha.convert(sd_mecha.literal(blocks, config="sd1-supermerger_blocks"), "sd1-ldm")
    sd_mecha.weighted_sum(a, sd_mecha_rebasin.rebasin(b, a), alpha=alpha)
"""

from __future__ import annotations

from typing import Any

import sd_mecha
from _common import merge, model, parser, rebasin_options

from sd_mecha_rebasin import rebasin
from sd_mecha_rebasin.mecha.blocks import Alpha, parse_alpha
from sd_mecha_rebasin.mecha.interface import inferred_config

OUTER_TO_B = "BASE=0,M00=0.5," + ",".join(f"OUT{i:02}=1" for i in range(12)) + ",default=0"
"""SD1/SD2 example: A's BASE and input blocks, the middle block averaged, pi(B)'s output blocks."""


def recipe(
    a: Any, b: Any, alpha: str | float | Alpha = OUTER_TO_B, config: str | None = None, **options: Any
) -> Any:
    """`b` aligned to `a`, then averaged with it block by block; `alpha` is B's weight (a number,
    the text forms of `sd_mecha_rebasin.mecha.blocks.parse_alpha`, or its result). `config`: A's sd-mecha
    config (default: inferred from `a`, as sd-mecha would). Raises ValueError for block weights
    that do not fit the family, or a model whose config sd-mecha cannot tell."""
    a = model(a)
    config = config or inferred_config(a)
    if config is None:
        raise ValueError(
            f"{a!r}: not a model sd-mecha recognises; pass config='sd1-ldm', 'sd2-ldm' or 'sdxl-sgm'"
        )
    weights = alpha if isinstance(alpha, Alpha) else parse_alpha(alpha)
    return sd_mecha.weighted_sum(a, rebasin(model(b), a, **options), alpha=weights.node(config))


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], "A B")
    p.add_argument("--alpha", default=OUTER_TO_B, help=f"B's weight per block (default {OUTER_TO_B})")
    p.add_argument("--alpha-default", type=float, default=None, help="weight of blocks --alpha leaves out")
    args = p.parse_args(argv)
    try:
        node = recipe(args.a, args.b, parse_alpha(args.alpha, args.alpha_default), **rebasin_options(args))
    except ValueError as e:
        p.error(str(e))
    merge(node, args.out, args.dtype)


if __name__ == "__main__":
    main()
