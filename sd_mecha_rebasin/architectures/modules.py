"""Architecture rules: what each kind of module reads, writes and may permute.

Every rule takes the `SpecBuilder`, the module's key prefix and the spaces its inputs live in, binds
the module's tensors, and returns the space its output lives in. Models (`unet.py`,
`text_encoders.py`) are sequences of these rules; adding an architecture means composing them.
Weight layout is PyTorch's: `weight[out, in, ...]`, so axis 0 writes a space and axis 1 reads one.
"""

from __future__ import annotations

import re

import numpy as np

from ..permutations import groups
from ..permutations.spec import SpecBuilder

Input = list[str]
"""The spaces an input axis reads, concatenated in order (usually one)."""


def numbered(b: SpecBuilder, prefix: str) -> list[str]:
    """Sorted `prefix<i>.` prefixes of the numbered submodules present in the layout."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in b.shapes if (m := pattern.match(key))}
    return [f"{prefix}{i}." for i in sorted(found)]


def linear(b: SpecBuilder, prefix: str, inp: Input | None, out: str | None) -> None:
    """A Linear/Conv layer: rows (and bias) write `out`, columns read `inp`; None = not permuted."""
    if out is not None:
        b.bind(prefix + "weight", 0, out)
        b.bind(prefix + "bias", 0, out)
    if inp is not None:
        b.bind_concat(prefix + "weight", 1, inp)


def norm(b: SpecBuilder, prefix: str, inp: Input) -> None:
    """LayerNorm: any permutation, weight and bias move with the stream."""
    for name in ("weight", "bias"):
        b.bind_concat(prefix + name, 0, inp)


def group_norm(b: SpecBuilder, prefix: str, inp: Input, num_groups: int) -> None:
    """GroupNorm over a (possibly concatenated) input: constrains every stream it reads."""
    norm(b, prefix, inp)
    total = sum(b.width(s) for s in inp)
    if total % num_groups:
        raise ValueError(f"{prefix}: {total} channels do not split into {num_groups} groups")
    offset = 0
    for space in inp:
        width = b.width(space)
        b.constrain(space, groups.groupnorm_cuts(total, num_groups, offset, width))
        offset += width


def mlp(b: SpecBuilder, prefix: str, fc_in: str, fc_out: str, stream: str) -> None:
    """Two-layer MLP with an elementwise activation: its hidden units permute freely."""
    hidden = b.space(prefix.rstrip("."), "mlp_hidden", groups.Atom(b.shape(prefix + fc_in + "weight")[0]))
    linear(b, prefix + fc_in, [stream], hidden)
    linear(b, prefix + fc_out, [hidden], stream)


def geglu(b: SpecBuilder, prefix: str, stream: str) -> None:
    """GEGLU feed-forward: `proj` rows are [value; gate]; one permutation moves both halves."""
    proj, out = prefix + "net.0.proj.", prefix + "net.2."
    inner = b.shape(proj + "weight")[0] // 2
    hidden = b.space(prefix.rstrip("."), "geglu_hidden", groups.Atom(inner))
    for half in (0, inner):
        b.bind(proj + "weight", 0, hidden, start=half)
        b.bind(proj + "bias", 0, hidden, start=half)
    b.bind(proj + "weight", 1, stream)
    linear(b, out, [hidden], stream)


def _head_space(b: SpecBuilder, name: str, width: int, heads: int | None, head_dim: int | None):
    if heads is None:
        if head_dim is None or width % head_dim:
            raise ValueError(f"{name}: cannot split {width} channels into heads of {head_dim}")
        heads = width // head_dim
    if width % heads:
        raise ValueError(f"{name}: cannot split {width} channels into {heads} heads")
    d = width // heads
    space = b.space(name, "attention_heads", groups.attention_heads(heads, d))
    base = np.arange(heads)[:, None] * 2 * d
    qk = (base + np.arange(d)).reshape(-1)
    vo = (base + d + np.arange(d)).reshape(-1)
    return space, qk, vo


def attention(
    b: SpecBuilder,
    prefix: str,
    query: Input,
    context: Input,
    out: str,
    *,
    heads: int | None = None,
    head_dim: int | None = None,
    names: tuple[str, str, str, str] = ("to_q.", "to_k.", "to_v.", "to_out.0."),
) -> None:
    """Multi-head attention with separate q/k/v/out projections.

    Whole heads move together; inside a head q and k rows share one permutation (their dot product
    is unchanged), v rows and the out-projection columns another.
    """
    q, k, v, o = (prefix + n for n in names)
    width = b.shape(q + "weight")[0]
    space, qk, vo = _head_space(b, prefix.rstrip("."), width, heads, head_dim)
    for proj, units, inp in ((q, qk, query), (k, qk, context), (v, vo, context)):
        b.bind(proj + "weight", 0, space, units)
        b.bind(proj + "bias", 0, space, units)
        b.bind_concat(proj + "weight", 1, inp)  # no context streams (UNet-only): columns stay
    b.bind(o + "weight", 1, space, vo)
    linear(b, o, None, out)


def fused_attention(b: SpecBuilder, prefix: str, stream: str, *, heads: int) -> None:
    """OpenCLIP / nn.MultiheadAttention: q, k, v stacked in `in_proj_weight` rows [q; k; v]."""
    width = b.shape(prefix + "in_proj_weight")[1]
    space, qk, vo = _head_space(b, prefix.rstrip("."), width, heads, None)
    for start, units in ((0, qk), (width, qk), (2 * width, vo)):
        b.bind(prefix + "in_proj_weight", 0, space, units, start=start)
        b.bind(prefix + "in_proj_bias", 0, space, units, start=start)
    b.bind(prefix + "in_proj_weight", 1, stream)
    b.bind(prefix + "out_proj.weight", 1, space, vo)
    linear(b, prefix + "out_proj.", None, stream)
