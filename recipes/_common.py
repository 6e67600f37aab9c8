"""What the recipe scripts share: model arguments, re-basin options, and the merge to a file.

A script is `python recipes/<name>.py MODELS... OUT [options]`; each also exposes `recipe(...)`, the
sd-mecha recipe it merges (taking paths or recipe nodes), for use from Python.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

import sd_mecha
import torch

import sd_mecha_rebasin  # noqa: F401  (registers the git_rebasin merge method and the sd2-ldm config)
from sd_mecha_rebasin.common import events

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def model(path_or_node: Any) -> Any:
    """A recipe node for a checkpoint path (sd-mecha detects its config), or the node itself."""
    if isinstance(path_or_node, (str, pathlib.Path)):
        return sd_mecha.model(pathlib.Path(path_or_node))
    return path_or_node


def parser(description: str, models: str) -> argparse.ArgumentParser:
    """Positional `models` (e.g. "A B"), then OUT, plus the re-basin and output options."""
    p = argparse.ArgumentParser(description=description)
    for name in models.split():
        nargs = "+" if name.endswith("...") else None
        p.add_argument(name.rstrip(".").lower(), metavar=name, nargs=nargs, type=pathlib.Path)
    p.add_argument("out", metavar="OUT", type=pathlib.Path, help="merged checkpoint (.safetensors)")
    p.add_argument("--iters", type=int, default=100, help="most weight-matching sweeps (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sweep order (default 0)")
    p.add_argument("--threads", type=int, default=0, help="pre-pass threads, 0: one per CPU (default)")
    p.add_argument("--device", default="cpu", help="torch device of the pre-pass (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="output dtype (default fp16)")
    return p


def rebasin_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"iters": args.iters, "seed": args.seed, "threads": args.threads, "device": args.device}


def _print_sweeps(event: str, data: dict[str, Any]) -> None:
    if event == "sweep":
        s = data["stats"]
        print(
            f"re-basin sweep {s.sweep}: {s.changed} permutations changed, distance to ref x{s.rel_distance:.4f}",
            file=sys.stderr,
        )


def merge(recipe: Any, out: pathlib.Path, dtype: str = "fp16") -> None:
    """Merge `recipe` into the file `out`, printing the pre-pass sweeps."""
    with events.listening(_print_sweeps):
        sd_mecha.merge(recipe, output=out, output_dtype=DTYPES[dtype])
