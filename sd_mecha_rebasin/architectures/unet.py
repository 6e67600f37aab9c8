"""The LDM/SGM UNet (SD1, SD2, SDXL) in its original key layout, as a walk over its modules.

What the walk knows about the architecture, and nothing more:
- `input_blocks.i.j`, `middle_block.j`, `output_blocks.i.j` run in order; every input block's output
  is pushed on a stack, and every output block starts by concatenating `cat([h, stack.pop()])`.
- module kinds are recognised by their parameters: ResBlock (`in_layers`), SpatialTransformer
  (`proj_in`), Downsample (`op`), Upsample (`conv`), the stem convolution (plain `weight`).
- a ResBlock with an identity skip keeps its input stream; one with `skip_connection`, and every
  convolution between blocks, starts a new stream. A SpatialTransformer adds to its input stream.
- the time embedding (and SDXL's label embedding) writes one space read by every ResBlock.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..permutations import groups
from ..permutations.spec import SpecBuilder
from .modules import attention, geglu, group_norm, linear, norm, numbered


@dataclass(frozen=True)
class UnetFacts:
    """What the key layout cannot tell: head split and GroupNorm group count."""

    groupnorm_groups: int = 32
    num_heads: int | None = None
    head_dim: int | None = None


def _kind(b: SpecBuilder, p: str) -> str:
    if b.has(p + "in_layers.0.weight"):
        return "resblock"
    if b.has(p + "proj_in.weight"):
        return "transformer"
    if b.has(p + "op.weight"):
        return "downsample"
    if b.has(p + "conv.weight"):
        return "upsample"
    if b.has(p + "weight"):
        return "conv"
    raise ValueError(f"unrecognised UNet module {p!r}")


class UnetWalk:
    def __init__(self, b: SpecBuilder, prefix: str, facts: UnetFacts, context: list[str], pooled: str | None):
        self.b, self.prefix, self.facts, self.context = b, prefix, facts, context
        self.emb = self._embeddings(pooled)

    def _embeddings(self, pooled: str | None) -> str:
        b, p = self.b, self.prefix
        width = b.shape(p + "time_embed.2.weight")[0]
        emb = b.space(p + "time_embed", "embedding", groups.Atom(width))
        hidden = b.space(
            p + "time_embed.0", "embedding_hidden", groups.Atom(b.shape(p + "time_embed.0.weight")[0])
        )
        linear(b, p + "time_embed.0.", None, hidden)
        linear(b, p + "time_embed.2.", [hidden], emb)
        if b.has(p + "label_emb.0.0.weight"):
            label = b.space(
                p + "label_emb.0", "embedding_hidden", groups.Atom(b.shape(p + "label_emb.0.0.weight")[0])
            )
            linear(b, p + "label_emb.0.0.", None, label)
            if pooled is not None:  # SDXL: the pooled text vector is the first slice of the ADM input
                b.bind(p + "label_emb.0.0.weight", 1, pooled)
            linear(b, p + "label_emb.0.2.", [label], emb)
        return emb

    def module(self, p: str, inp: list[str]) -> str:
        kind = _kind(self.b, p)
        if kind == "resblock":
            return self.resblock(p, inp)
        if len(inp) != 1 and kind != "conv":
            raise ValueError(f"{p}: a {kind} cannot read a concatenation")
        if kind == "transformer":
            return self.transformer(p, inp[0])
        conv = {"downsample": "op.", "upsample": "conv.", "conv": ""}[kind]
        out = self.b.stream(p + conv + "out", "unet_stream", self.b.shape(p + conv + "weight")[0])
        linear(self.b, p + conv, None if kind == "conv" else inp, out)
        return out

    def resblock(self, p: str, inp: list[str]) -> str:
        b, g = self.b, self.facts.groupnorm_groups
        group_norm(b, p + "in_layers.0.", inp, g)
        inner = b.stream(p + "inner", "resblock_inner", b.shape(p + "in_layers.2.weight")[0])
        linear(b, p + "in_layers.2.", inp, inner)
        linear(b, p + "emb_layers.1.", [self.emb], inner)
        group_norm(b, p + "out_layers.0.", [inner], g)
        if b.has(p + "skip_connection.weight"):
            out = b.stream(p + "out", "unet_stream", b.shape(p + "skip_connection.weight")[0])
            linear(b, p + "skip_connection.", inp, out)
        elif len(inp) == 1:
            out = inp[0]
        else:
            raise ValueError(f"{p}: a ResBlock over a concatenation needs a skip_connection")
        linear(b, p + "out_layers.3.", [inner], out)
        return out

    def transformer(self, p: str, stream: str) -> str:
        b, f = self.b, self.facts
        group_norm(b, p + "norm.", [stream], f.groupnorm_groups)
        inner = b.stream(p + "inner", "transformer_inner", b.shape(p + "proj_in.weight")[0])
        linear(b, p + "proj_in.", [stream], inner)
        for block in numbered(b, p + "transformer_blocks."):
            for n in ("norm1.", "norm2.", "norm3."):
                norm(b, block + n, [inner])
            attention(b, block + "attn1.", [inner], [inner], inner, heads=f.num_heads, head_dim=f.head_dim)
            attention(
                b, block + "attn2.", [inner], self.context, inner, heads=f.num_heads, head_dim=f.head_dim
            )
            geglu(b, block + "ff.", inner)
        linear(b, p + "proj_out.", [inner], stream)
        return stream

    def run(self) -> None:
        b, p = self.b, self.prefix
        skips: list[str] = []
        h: list[str] = []
        for block in numbered(b, p + "input_blocks."):
            for sub in numbered(b, block):
                h = [self.module(sub, h)]
            skips.append(h[0])
        for sub in numbered(b, p + "middle_block."):
            h = [self.module(sub, h)]
        for block in numbered(b, p + "output_blocks."):
            h = h + [skips.pop()]
            for sub in numbered(b, block):
                h = [self.module(sub, h)]
        group_norm(b, p + "out.0.", h, self.facts.groupnorm_groups)
        linear(b, p + "out.2.", h, None)  # output channels are the model's output: never permuted


def ldm_unet(
    b: SpecBuilder, prefix: str, facts: UnetFacts, context: list[str], pooled: str | None = None
) -> None:
    UnetWalk(b, prefix, facts, context, pooled).run()
