"""The demo's two small SD1-layout models as files (no merge run): fast inputs for CLI-level tests."""

from __future__ import annotations

import pathlib

from sd_mecha_rebasin.architectures.small import DEMO_LAYOUT, DEMO_LAYOUT_KEY
from sd_mecha_rebasin.cli.demo import make_models
from sd_mecha_rebasin.files.output import write_safetensors


def write_demo_pair(folder: pathlib.Path, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """`folder/A.safetensors` and `folder/B.safetensors`: B is a legal permutation of A plus noise."""
    a, b, _, _ = make_models(seed)
    paths = folder / "A.safetensors", folder / "B.safetensors"
    for path, sd in zip(paths, (a, b)):
        write_safetensors(path, sd, {DEMO_LAYOUT_KEY: DEMO_LAYOUT})
    return paths
