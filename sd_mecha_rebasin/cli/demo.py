"""`sd-rebasin demo`: two small models of the real SD1 key layout, merged without and with re-basin.

The models keep every key name of sd-mecha's `sd1-ldm` config (text encoder and UNet; plus the
scheduler buffers and `position_ids` that real checkpoints carry) with every width divided by
about ten, so the whole demo runs in seconds on two cores and downloads nothing. B is A under a
random legal permutation plus fine-tune-like noise: the same network in another basis. Both merges
run through the same code as `sd-rebasin merge` (the plain average is a merge with no sweeps).
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import tempfile
import time
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..architectures.small import CONFIG, SMALL_ARCH, small_shapes


def random_weights(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Fan-in scaled normal weights (norm scales near 1, small biases), one generator per key."""
    out = {}
    for key, shape in shapes.items():
        gen = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(key.encode())) % (2**63))
        t = torch.randn(shape, generator=gen)
        if len(shape) >= 2:
            t *= math.prod(shape[1:]) ** -0.5
        elif key.endswith("weight"):
            t = 1.0 + 0.1 * t
        else:
            t *= 0.1
        out[key] = t
    return out


def scheduler_buffers(steps: int = 1000) -> dict[str, torch.Tensor]:
    """The 12 DDPM buffers LDM checkpoints carry (SD1's scaled-linear schedule), as stored in fp32."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    cum = torch.cumprod(alphas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), cum[:-1]])
    post_var = betas * (1.0 - prev) / (1.0 - cum)
    buffers = {
        "betas": betas,
        "alphas_cumprod": cum,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": cum.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - cum).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cum).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / cum).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / cum - 1.0).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.cat([post_var[1:2], post_var[1:]]).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - cum),
        "posterior_mean_coef2": (1.0 - prev) * alphas.sqrt() / (1.0 - cum),
    }
    return {k: v.float() for k, v in buffers.items()}


def make_models(seed: int = 0, noise: float = 0.02):
    """(A, B, hidden permutation, spec): B = hidden(A) + noise * std per tensor, plus real buffers."""
    from ..architectures import permutation_spec
    from ..permutations.spec import apply_permutation, random_permutation

    shapes = small_shapes()
    spec = permutation_spec(CONFIG, arch=SMALL_ARCH, shapes=shapes)
    a = random_weights(shapes, seed)
    hidden = random_permutation(spec, seed + 1)
    b = apply_permutation(spec, hidden, a)
    gen = torch.Generator().manual_seed(seed + 2)
    for key, t in b.items():
        if t.numel() > 1:
            b[key] = t + noise * t.std() * torch.randn(t.shape, generator=gen)
    extras = {
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0)
    }
    extras.update(scheduler_buffers())
    return {**a, **extras}, {**b, **extras}, hidden, spec


def _rel(
    x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], keys, base: Mapping[str, torch.Tensor]
) -> float:
    num = sum(float((x[k].double() - y[k].double()).pow(2).sum()) for k in keys)
    den = sum(float(base[k].double().pow(2).sum()) for k in keys)
    return math.sqrt(num / den)


def run_demo(
    out_dir: pathlib.Path | None = None,
    seed: int = 0,
    noise: float = 0.02,
    threads: int = 0,
    overwrite: bool = False,
    quiet: bool = False,
    echo=print,
) -> dict[str, Any]:
    """Write A and B, merge them twice (plain average, re-basin), print and return the comparison."""
    from safetensors.torch import load_file

    from ..architectures.small import DEMO_LAYOUT, DEMO_LAYOUT_KEY
    from ..files.output import write_safetensors
    from ..permutations.spec import invert
    from .jobs import RunOptions, run

    t0 = time.perf_counter()
    say = (lambda *a, **k: None) if quiet else echo
    with contextlib.ExitStack() as stack:
        if out_dir is None:
            out_dir = pathlib.Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="sd-rebasin-demo-"))
            )
            keep = False
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            keep = True
        a, b, hidden, spec = make_models(seed, noise)
        files = {
            name: out_dir / f"{name}.safetensors" for name in ("A", "B", "plain_average", "rebasin_merge")
        }
        for name, sd in (("A", a), ("B", b)):
            if files[name].exists() and not overwrite:
                from ..common.errors import UserError

                raise UserError("already exists; pass --overwrite to replace it", files[name])
            write_safetensors(
                files[name],
                sd,
                {"modelspec.title": f"sd-rebasin demo model {name}", DEMO_LAYOUT_KEY: DEMO_LAYOUT},
            )
        params = sum(t.numel() for t in a.values())
        say(
            f"sd-rebasin demo: two small models with the SD1 key layout ({len(a)} keys, {params / 1e6:.1f} M parameters)"
        )
        say(
            f"  A: random weights; B: A under a random legal permutation ({len(spec.spaces)} permutations) "
            f"+ {noise:g} x std noise per tensor"
        )
        opts = RunOptions(
            threads=threads, output_dtype="fp32", overwrite=True, quiet=True, progress=False, metadata=keep
        )
        run("average", files["A"], files["B"], files["plain_average"], opts)
        rebased = run("merge", files["A"], files["B"], files["rebasin_merge"], opts)
        keys = sorted(spec.axes)
        plain_sd, rebased_sd = load_file(files["plain_average"]), load_file(files["rebasin_merge"])
        expected = invert(hidden)
        exact = sum(1 for n in spec.spaces if np.array_equal(rebased.perms.get(n), expected[n]))
        report = {
            "keys": len(a),
            "parameters": params,
            "permutations": len(spec.spaces),
            "noise": noise,
            "distance_a_b": _rel(b, a, keys, a),
            "distance_a_aligned_b": rebased.rel_distance * _rel(b, a, keys, a),
            "plain_average_distance_to_a": _rel(plain_sd, a, keys, a),
            "plain_average_norm_ratio": _norm_ratio(plain_sd, a, keys),
            "rebasin_distance_to_a": _rel(rebased_sd, a, keys, a),
            "rebasin_norm_ratio": _norm_ratio(rebased_sd, a, keys),
            "sweeps": rebased.sweeps,
            "permutations_recovered": exact,
            "recovered": exact == len(spec.spaces),
            "seconds": round(time.perf_counter() - t0, 2),
            "files": {k: str(v) for k, v in files.items()} if keep else None,
        }
        say(f"  ||B - A|| / ||A||                          {report['distance_a_b']:.3f}")
        say(f"  ||pi(B) - A|| / ||A|| after re-basin       {report['distance_a_aligned_b']:.3f}")
        say(
            f"  plain average:  ||M - A|| / ||A|| = {report['plain_average_distance_to_a']:.3f}, "
            f"||M|| / ||A|| = {report['plain_average_norm_ratio']:.3f}  (two unaligned networks blurred together)"
        )
        say(
            f"  re-basin merge: ||M - A|| / ||A|| = {report['rebasin_distance_to_a']:.3f}, "
            f"||M|| / ||A|| = {report['rebasin_norm_ratio']:.3f}"
        )
        verdict = "yes" if report["recovered"] else "NO"
        say(
            f"  re-basin recovered the hidden permutation: {verdict} ({exact} of {len(spec.spaces)} exact) "
            f"in {rebased.sweeps} sweep{'s' if rebased.sweeps != 1 else ''}; {report['seconds']:.1f} s in all"
        )
        if keep:
            say(f"  files in {out_dir}: " + ", ".join(p.name for p in files.values()))
        return report


def _norm_ratio(x: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], keys) -> float:
    num = sum(float(x[k].double().pow(2).sum()) for k in keys)
    den = sum(float(base[k].double().pow(2).sum()) for k in keys)
    return math.sqrt(num / den)
