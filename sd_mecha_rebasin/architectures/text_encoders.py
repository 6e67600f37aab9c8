"""Text encoders: pre-LayerNorm transformers whose residual stream runs from the embeddings to the
final LayerNorm and on into the UNet's cross-attention. Token and position rows are never permuted.
"""

from __future__ import annotations

from ..permutations import groups
from ..permutations.spec import SpecBuilder
from .modules import attention, fused_attention, linear, mlp, norm, numbered


def _stream(b: SpecBuilder, prefix: str, width: int) -> str:
    return b.space(prefix + "residual", "text_stream", groups.Atom(width))


def hf_clip(b: SpecBuilder, prefix: str, heads: int, pooled: str | None = None) -> str:
    """transformers' CLIPTextModel layout (`embeddings.`, `encoder.layers.N.`, `final_layer_norm.`)."""
    width = b.shape(prefix + "embeddings.token_embedding.weight")[1]
    r = _stream(b, prefix, width)
    b.bind(prefix + "embeddings.token_embedding.weight", 1, r)
    b.bind(prefix + "embeddings.position_embedding.weight", 1, r)
    for layer in numbered(b, prefix + "encoder.layers."):
        norm(b, layer + "layer_norm1.", [r])
        attention(
            b,
            layer + "self_attn.",
            [r],
            [r],
            r,
            heads=heads,
            names=("q_proj.", "k_proj.", "v_proj.", "out_proj."),
        )
        norm(b, layer + "layer_norm2.", [r])
        mlp(b, layer + "mlp.", "fc1.", "fc2.", r)
    norm(b, prefix + "final_layer_norm.", [r])
    if pooled is not None:  # CLIPTextModelWithProjection: a Linear, weight[out, in]
        linear(b, prefix + "text_projection.", [r], pooled)
    return r


def open_clip(b: SpecBuilder, prefix: str, heads: int, pooled: str | None = None) -> str:
    """open_clip's TextTransformer layout (`transformer.resblocks.N.`, fused `in_proj`, `ln_final`).

    `text_projection` is used as `x @ W`: its rows read the stream; its columns write the pooled
    vector, permuted only when a pooled space is given (SDXL feeds it to `label_emb`).
    """
    width = b.shape(prefix + "token_embedding.weight")[1]
    r = _stream(b, prefix, width)
    b.bind(prefix + "token_embedding.weight", 1, r)
    b.bind(prefix + "positional_embedding", 1, r)
    for block in numbered(b, prefix + "transformer.resblocks."):
        norm(b, block + "ln_1.", [r])
        fused_attention(b, block + "attn.", r, heads=heads)
        norm(b, block + "ln_2.", [r])
        mlp(b, block + "mlp.", "c_fc.", "c_proj.", r)
    norm(b, prefix + "ln_final.", [r])
    b.bind(prefix + "text_projection", 0, r)
    if pooled is not None:
        b.bind(prefix + "text_projection", 1, pooled)
    return r


TEXT_ENCODERS = {"hf_clip": hf_clip, "open_clip": open_clip}
