"""Print the coverage table of docs/how-it-works.md: what the spec permutes in each shipped config.

python tools/coverage_table.py
"""

from __future__ import annotations

import sd_mecha_rebasin
from sd_mecha_rebasin.architectures import config_shapes

CONFIGS = ("sd1-ldm", "sd2-ldm", "sdxl-sgm")
KINDS = {
    "attention_heads": "attention (heads + q/k and v/out inside heads)",
    "geglu_hidden": "UNet GEGLU hidden",
    "mlp_hidden": "text-encoder MLP hidden",
    "resblock_inner": "ResBlock inner channels (GroupNorm groups)",
    "transformer_inner": "SpatialTransformer inner stream",
    "unet_stream": "UNet residual streams (GroupNorm + skip concat)",
    "text_stream": "text-encoder residual stream (+ UNet attn2 k/v columns)",
    "embedding": "time / label / pooled-text embedding",
    "embedding_hidden": "embedding MLP hidden",
}


def main() -> None:
    specs = {c: sd_mecha_rebasin.permutation_spec(c) for c in CONFIGS}
    print("| permutations of | " + " | ".join(CONFIGS) + " |")
    print("|---|" + "---|" * len(CONFIGS))
    for kind, label in KINDS.items():
        cells = []
        for c in CONFIGS:
            row = specs[c].summary().get(kind)
            if not row:
                cells.append("-")
                continue
            cell = f"{row['permutations']} ({row['units']} units)"
            if row["restricted"]:
                cell += f", {row['restricted']} restricted"
            cells.append(cell)
        print(f"| {label} | " + " | ".join(cells) + " |")
    totals = []
    for c in CONFIGS:
        spec = specs[c]
        totals.append(f"{len(spec.spaces)} perms, {len(spec.axes)} of {len(config_shapes(c))} keys")
    print("| **total** | " + " | ".join(totals) + " |")


if __name__ == "__main__":
    main()
