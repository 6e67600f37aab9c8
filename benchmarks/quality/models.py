"""SD1-layout models at a chosen width: transformers CLIPTextModel + diffusers UNet2DConditionModel.

The checkpoint layout is sd-mecha's `sd1-ldm` (every text-encoder and UNet key name, read from
sd-mecha through `sd_mecha_rebasin.model_configs.sd_layouts`), with every width scaled from SD1's:
UNet base channels 320 -> `Width.unet` (all UNet widths scale alike; 8 attention heads as in SD1, or
heads of a fixed width `Width.head_width` as in SD2/SDXL), CLIP width 768 -> `Width.clip` (MLP 4x, 12 layers), vocabulary 49408 -> `data.VOCAB`, 77 positions kept. LDM names
map to diffusers names through diffusers' own `convert_ldm_unet_checkpoint` (the mapping the
forward-pass harness uses), computed once per width on meta tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from sd_mecha_rebasin.model_configs.sd_layouts import (
    PREFIXES,
    SD_UNET_COMMON,
    UNET_PREFIX,
    component_of,
    full_key_shapes,
)

from . import data

CLIP_PREFIX = PREFIXES["sd1"]["clip_l"]
_KEPT_DIMS = frozenset({1, 3, 4, 77})  # kernels, latent channels, token positions


@dataclass(frozen=True)
class Width:
    """Widths of one model size: UNet base channels (SD1: 320), CLIP width (SD1: 768), CLIP heads
    (SD1: 12) and GroupNorm groups (SD1: 32).

    `head_width` None: 8 UNet heads at every level (SD1's rule) and `clip_heads` CLIP heads, so the
    head width grows with the model. A number: every UNet and CLIP attention head has that many
    channels (SD2/SDXL's rule: heads per level = channels / head_width), so two widths can be
    compared at the same head width (issue 20.3); `clip_heads` is then unused. Raises ValueError
    (from `unet_heads`, `text_heads`) when a width does not split into such heads."""

    unet: int
    clip: int
    clip_heads: int = 4
    groups: int = 8
    head_width: int | None = None

    @property
    def name(self) -> str:
        return f"c{self.unet}" + (f"h{self.head_width}" if self.head_width else "")

    def unet_heads(self, channels: int) -> int:
        """Attention heads of a UNet transformer with this many channels."""
        return 8 if self.head_width is None else self._split(channels)

    @property
    def text_heads(self) -> int:
        """Attention heads of the CLIP text encoder."""
        return self.clip_heads if self.head_width is None else self._split(self.clip)

    def _split(self, channels: int) -> int:
        if channels % self.head_width:
            raise ValueError(f"{channels} channels do not split into heads of {self.head_width}")
        return channels // self.head_width

    def dims(self, component: str) -> dict[int, int]:
        """SD1 dimension -> this width's, for one component (`clip_l` or `unet`)."""
        if component == "clip_l":
            return {49408: data.VOCAB, 768: self.clip, 3072: 4 * self.clip}
        c = self.unet
        return {320 * k: c * k for k in (1, 2, 3, 4, 6, 8, 16, 32)} | {768: self.clip}


def ldm_shapes(width: Width) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the text encoder and UNet in the `sd1-ldm` layout at this width."""
    out = {}
    for key, shape in full_key_shapes("sd1").items():
        table = width.dims(component_of("sd1", key))
        out[key] = tuple(table[d] if d in table else d for d in shape)
        bad = [d for d in shape if d not in table and d not in _KEPT_DIMS]
        if bad:
            raise ValueError(f"no scaled size for dimension {bad} of {key} {shape}")
    return out


def arch(width: Width) -> dict[str, dict[str, int]]:
    """Architecture facts for `permutation_spec("sd1-ldm", arch=..., shapes=ldm_shapes(width))`."""
    if width.head_width is None:
        unet = {"num_heads": 8, "groupnorm_groups": width.groups}
    else:
        unet = {"head_dim": width.head_width, "groupnorm_groups": width.groups}
    return {"unet": unet, "clip_l": {"heads": width.text_heads}}


def unet_config(width: Width) -> dict:
    c = width.unet
    return {
        **SD_UNET_COMMON,
        "sample_size": 8,
        "block_out_channels": (c, 2 * c, 4 * c, 4 * c),
        "norm_num_groups": width.groups,
        "cross_attention_dim": width.clip,
        # diffusers' name for the heads per level (SD1: 8 everywhere; SD2: [5, 10, 20, 20])
        "attention_head_dim": 8
        if width.head_width is None
        else tuple(width.unet_heads(c * m) for m in (1, 2, 4, 4)),
    }


def clip_config(width: Width):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=data.VOCAB,
        hidden_size=width.clip,
        intermediate_size=4 * width.clip,
        num_hidden_layers=12,
        num_attention_heads=width.text_heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=data.BOS,
        eos_token_id=data.EOS,
        pad_token_id=data.EOS,
    )


class SDModel(nn.Module):
    """Text encoder + UNet wired as SD1: the UNet cross-attends to CLIP's last hidden state (after
    the final LayerNorm) of the prompt "digit <label>"."""

    def __init__(self, width: Width):
        super().__init__()
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        self.width = width
        self.text = CLIPTextModel(clip_config(width))
        self.unet = UNet2DConditionModel(**unet_config(width))
        self.register_buffer("prompts", data.class_prompts(), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predicted noise [B, 4, S, S] for noisy latents x [B, 4, S, S], timesteps t [B], labels [B]."""
        context = self.text(input_ids=self.prompts).last_hidden_state  # [10, PROMPT_LEN, clip]
        return self.unet(x, t, encoder_hidden_states=context[labels]).sample


@cache
def _unet_names(width: Width) -> tuple[tuple[str, str], ...]:
    """(LDM key, diffusers key) pairs of the UNet, from diffusers' converter run on meta tensors."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(width))
    ldm = {
        k: torch.empty(s, device="meta") for k, s in ldm_shapes(width).items() if k.startswith(UNET_PREFIX)
    }
    by_id = {id(t): k for k, t in ldm.items()}
    converted = convert_ldm_unet_checkpoint(ldm, unet.config)
    pairs = tuple((by_id[id(t)], name) for name, t in converted.items() if id(t) in by_id)
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    if len(pairs) != len(ldm) or {d for _, d in pairs} != set(expected):
        raise KeyError(
            f"UNet converter: {len(ldm)} LDM keys, {len(pairs)} mapped, {len(expected)} in diffusers"
        )
    for k, d in pairs:
        if tuple(ldm[k].shape) != expected[d]:
            raise ValueError(f"{k} {tuple(ldm[k].shape)} -> {d} {expected[d]}")
    return pairs


def to_ldm(model: SDModel) -> dict[str, torch.Tensor]:
    """The model's weights as an `sd1-ldm` state dict (detached copies, float32)."""
    out = {CLIP_PREFIX + k: v.detach().clone() for k, v in model.text.state_dict().items()}
    unet = model.unet.state_dict()
    out.update({k: unet[d].detach().clone() for k, d in _unet_names(model.width)})
    expected = ldm_shapes(model.width)
    if {k: tuple(v.shape) for k, v in out.items()} != expected:
        raise KeyError("model does not produce the sd1-ldm layout at its width")
    return out


def from_ldm(width: Width, state_dict: dict[str, torch.Tensor]) -> SDModel:
    """An SDModel holding the given `sd1-ldm` weights (shared, not copied: built on the meta device
    and loaded by assignment). Raises RuntimeError on a missing or unexpected key (strict load)."""
    with torch.device("meta"):
        model = SDModel(width)
    model.prompts = data.class_prompts()
    model.text.embeddings.position_ids = torch.arange(77).expand(1, -1)
    text = {k[len(CLIP_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(CLIP_PREFIX)}
    unet = {d: state_dict[k] for k, d in _unet_names(width)}
    for module, sd in ((model.text, text), (model.unet, unet)):
        module.load_state_dict(sd, strict=True, assign=True)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left on the meta device: {meta[:5]}")
    return model


def build(width: Width, seed: int) -> SDModel:
    """A freshly initialised model (the libraries' own initialisation), seeded."""
    torch.manual_seed(seed)
    return SDModel(width)
