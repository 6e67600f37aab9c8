"""How far training moved each cached bench_quality model from its initialisation.

    python benchmarks/quality_drift.py

For every independent model in .bench_cache/quality/ (trained by bench_quality.py), prints
||trained - init|| / ||init|| over all weights, the text encoder and the UNet; the init is rebuilt
from the model's seed. Small values mean the model is mostly its random init, which weight matching
between two such models can only align as random weights.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import models  # noqa: E402
from benchmarks.quality.measure import relative_change  # noqa: E402
from benchmarks.quality.models import CLIP_PREFIX  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    pattern = re.compile(r"c(\d+)_ind_s(\d+)_.*_seed(\d+)\.safetensors")
    print("| model | steps | all weights | text encoder | UNet |\n|---|---|---|---|---|")
    for path in sorted((ROOT / ".bench_cache" / "quality").glob("c*_ind_*.safetensors")):
        match = pattern.fullmatch(path.name)
        if not match:
            continue
        c, steps, seed = map(int, match.groups())
        width = models.Width(unet=c, clip=2 * c, clip_heads=4, groups=8 if c >= 32 else 4)
        init = models.to_ldm(models.build(width, seed))
        trained = load_file(path)
        text = [k for k in init if k.startswith(CLIP_PREFIX)]
        unet = [k for k in init if not k.startswith(CLIP_PREFIX)]
        parts = [relative_change(init, trained, keys) for keys in (list(init), text, unet)]
        print(f"| c{c} seed {seed} | {steps} | " + " | ".join(f"{x:.3f}" for x in parts) + " |")


if __name__ == "__main__":
    main()
