"""Test-only ComfyUI custom node pack (copied into the test's ComfyUI, never installed for users):
makes the small SD1 models of `sd-rebasin demo` (sd1-ldm key names, widths / 10) usable in a real
ComfyUI, so that the comfy-mecha workflows run in seconds.

- ComfyUI recognizes a checkpoint by its UNet's widths (SD1.5: context 768, 320 channels): a model
  config for the small widths is put first in `comfy.supported_models.models`, with a text encoder
  of the small widths (64 wide, 4 heads, 1000 tokens), so comfy-mecha's Merger can load the merge.
- The small models' architecture facts that shapes do not tell (8 GroupNorm groups, 4 text-encoder
  heads; `architectures.small.SMALL_ARCH`) are what `sd-rebasin` reads from the demo files'
  metadata; merge nodes do not read metadata, so this pack sets them for sd1-ldm in this server
  (`arch_override`), as the tests do in process. A full-size SD1 must not share such a server.
It adds no node."""

import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base

from sd_mecha_rebasin.architectures.small import CONFIG, SMALL_ARCH
from sd_mecha_rebasin.mecha.merge_method import arch_override

SMALL_CLIP = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "vocab_size": 1000}


class SmallSD1ClipModel(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
        model_options = {**model_options, "clip_l_model_config": dict(SMALL_CLIP)}
        super().__init__(device=device, dtype=dtype, model_options=model_options, **kwargs)
        embeddings = self.clip_l.transformer.text_model.embeddings  # ComfyUI fixes the vocabulary at 49408
        old = embeddings.token_embedding
        embeddings.token_embedding = type(old)(
            SMALL_CLIP["vocab_size"], old.embedding_dim, dtype=old.weight.dtype, device=old.weight.device
        )


class SmallSD15(comfy.supported_models.SD15):
    unet_config = {**comfy.supported_models.SD15.unet_config, "context_dim": 64, "model_channels": 32}

    def clip_target(self, state_dict={}):  # noqa: B006
        return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, SmallSD1ClipModel)


if SmallSD15 not in comfy.supported_models.models:
    comfy.supported_models.models.insert(0, SmallSD15)

_OVERRIDE = arch_override(CONFIG, SMALL_ARCH)
_OVERRIDE.__enter__()  # for the server's lifetime

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
