"""Independent forward passes of SD1, SD2 and SDXL from a state dict in the LDM/SGM layout.

The models are the real third-party implementations, built from configs with no download:
transformers ``CLIPTextModel`` (CLIP-L), open_clip ``TextTransformer`` (OpenCLIP ViT-H / bigG)
and diffusers ``UNet2DConditionModel``. They are wired as the original LDM / SGM pipelines wire
them, so that "the permuted checkpoint computes the same function" can be checked end to end,
including the couplings between text encoders and UNet. From sd_mecha_rebasin only the key-layout
tables (`model_configs.sd_layouts`: prefixes, SD's diffusers UNet settings) are imported, none of
its permutation code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from functools import cache

import torch
from torch import nn

from sd_mecha_rebasin.model_configs.sd_layouts import PREFIXES, SD_UNET_COMMON, UNET_PREFIX

IMAGE_SCALE = 8  # VAE downsampling: SDXL's size conditioning is given in pixels
LATENT_SIZE = 16  # divisible by 2 ** (levels - 1) for SD1/SD2 (4 levels) and SDXL (3 levels)
PROMPT_TOKENS = 12
TIMESTEP = 500

# Keys that may be in a checkpoint but take no part in the forward pass; everything else outside
# the text encoder / UNet prefixes is an error, so that a renamed or misplaced key cannot go unseen.
_IGNORED_PREFIXES = ("first_stage_model.", "model_ema.", "edm_vpred.")
_IGNORED_KEYS = frozenset(
    {
        "v_pred",
        "ztsnr",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "betas",
        "log_one_minus_alphas_cumprod",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "posterior_variance",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
    }
)

# ---------------------------------------------------------------------------------------------
# Architectures. CLIP-L: (width, heads, mlp, layers, vocab); OpenCLIP: (width, heads, layers,
# vocab); mlp_ratio 4 for OpenCLIP. UNet: diffusers config (attention_head_dim = heads per level).
# ---------------------------------------------------------------------------------------------
_CLIP_L = {"full": (768, 12, 3072, 12, 49408), "tiny": (64, 4, 256, 12, 1000)}
_OPEN_CLIP = {
    ("clip_h", "full"): (1024, 16, 24, 49408),
    ("clip_h", "tiny"): (64, 4, 24, 1000),
    ("clip_g", "full"): (1280, 20, 32, 49408),
    ("clip_g", "tiny"): (96, 6, 32, 1000),
}

_SDXL_UNET_COMMON = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
}
_UNET: dict[tuple[str, str], dict] = {
    ("sd1", "full"): {
        **SD_UNET_COMMON,
        "block_out_channels": (320, 640, 1280, 1280),
        "norm_num_groups": 32,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    ("sd1", "tiny"): {
        **SD_UNET_COMMON,
        "block_out_channels": (32, 64, 128, 128),
        "norm_num_groups": 8,
        "cross_attention_dim": 64,
        "attention_head_dim": 8,
    },
    ("sd2", "full"): {
        **SD_UNET_COMMON,
        "block_out_channels": (320, 640, 1280, 1280),
        "norm_num_groups": 32,
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),  # head_dim 64
        "use_linear_projection": True,
    },
    ("sd2", "tiny"): {
        **SD_UNET_COMMON,
        "block_out_channels": (32, 64, 128, 128),
        "norm_num_groups": 8,
        "cross_attention_dim": 64,
        "attention_head_dim": (4, 8, 16, 16),  # head_dim 8
        "use_linear_projection": True,
    },
    ("sdxl", "full"): {
        **_SDXL_UNET_COMMON,
        "block_out_channels": (320, 640, 1280),
        "norm_num_groups": 32,
        "cross_attention_dim": 2048,
        "attention_head_dim": (5, 10, 20),  # head_dim 64
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
    ("sdxl", "tiny"): {
        **_SDXL_UNET_COMMON,
        "block_out_channels": (32, 64, 128),
        "norm_num_groups": 8,
        "cross_attention_dim": 160,
        "attention_head_dim": (4, 8, 16),  # head_dim 8
        "addition_time_embed_dim": 16,
        "projection_class_embeddings_input_dim": 192,
    },
}


# ---------------------------------------------------------------------------------------------
# open_clip without torchvision
# ---------------------------------------------------------------------------------------------
_OPEN_CLIP_ALIAS = "_harness_open_clip"


def open_clip_transformer() -> types.ModuleType:
    """The real ``open_clip/transformer.py`` module, loaded without ``open_clip/__init__.py``.

    ``import open_clip`` imports torchvision, which is not installed here (the PyPI torchvision
    wheels do not import beside the local torch build, and installing one would replace torch).
    The text tower needs none of it: ``transformer.py`` imports only ``utils.py`` (whose module
    level ``from torchvision.ops.misc import FrozenBatchNorm2d`` serves vision towers) and
    ``pos_embed.py``. So the installed open_clip directory is mounted as a private package
    (``_harness_open_clip``, never shadowing a real ``open_clip``), and, only if torchvision cannot
    be imported, a placeholder ``torchvision.ops.misc`` is put in ``sys.modules`` while these
    files load and removed afterwards.
    """
    name = f"{_OPEN_CLIP_ALIAS}.transformer"
    if name in sys.modules:
        return sys.modules[name]
    if "open_clip" in sys.modules and hasattr(sys.modules["open_clip"], "transformer"):
        return sys.modules["open_clip"].transformer
    spec = importlib.util.find_spec("open_clip")  # does not execute open_clip/__init__.py
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip_torch is not installed")
    package = types.ModuleType(_OPEN_CLIP_ALIAS)
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = _OPEN_CLIP_ALIAS
    sys.modules[_OPEN_CLIP_ALIAS] = package
    with _torchvision_placeholder():
        return importlib.import_module(name)


@contextmanager
def _torchvision_placeholder() -> Iterator[None]:
    try:
        import torchvision.ops.misc  # noqa: F401

        yield
        return
    except Exception:  # absent, or present but not loadable with this torch
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]

    class FrozenBatchNorm2d(nn.Module):
        """Placeholder: only vision towers (freeze_batch_norm_2d) would use it."""

        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision placeholder: FrozenBatchNorm2d is not available")

    stubs = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc")}
    stubs["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
    stubs["torchvision"].ops = stubs["torchvision.ops"]
    stubs["torchvision.ops"].misc = stubs["torchvision.ops.misc"]
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for n in stubs:
            sys.modules.pop(n, None)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _take(
    state_dict: MutableMapping[str, torch.Tensor], prefix: str, consume: bool
) -> dict[str, torch.Tensor]:
    """Sub-dict under prefix (prefix stripped), in fp32; popped from state_dict if consume."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    out = {}
    for k in keys:
        t = state_dict.pop(k) if consume else state_dict[k]
        out[k[len(prefix) :]] = t.to(torch.float32)
        del t
    return out


def _check_leftovers(family: str, state_dict: MutableMapping[str, torch.Tensor]) -> None:
    prefixes = tuple(PREFIXES[family].values())
    # position_ids of CLIP-L live under the text model prefix; everything else must be known.
    unknown = [
        k
        for k in state_dict
        if not k.startswith(prefixes) and not k.startswith(_IGNORED_PREFIXES) and k not in _IGNORED_KEYS
    ]
    if unknown:
        raise KeyError(f"keys outside the {family} text encoder(s) and UNet: {sorted(unknown)[:10]}")


def _load(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Strict load by assignment (no second copy); every parameter must be replaced."""
    try:
        result = module.load_state_dict(sd, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise KeyError(
                f"{what}: missing {sorted(result.missing_keys)[:10]} ({len(result.missing_keys)}), "
                f"unexpected {sorted(result.unexpected_keys)[:10]} ({len(result.unexpected_keys)})"
            )
        meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if meta:
            raise RuntimeError(f"{what}: tensors left on the meta device: {meta[:10]}")
    except BaseException:
        _release(module)
        raise
    sd.clear()


def _release(module: nn.Module) -> None:
    """Put every parameter and buffer back on the meta device: the weights are freed, and the
    next load must replace every tensor again (`_load` checks that none is left on meta)."""
    module.to("meta")


@contextmanager
def _loaded(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> Iterator[nn.Module]:
    """`module` (a cached architecture on the meta device) holding `sd` while in the block."""
    _load(module, sd, what)
    try:
        yield module
    finally:
        _release(module)


# Each architecture is built once per process, on the meta device (no weights are made): building
# a diffusers UNet runs its weight initialisers, which cost more than a tiny model's forward pass.
# A run assigns its weights into the cached module and puts it back on meta afterwards.
@cache
def _clip_l_module(size: str) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    width, heads, mlp, layers, vocab = _CLIP_L[size]
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    with torch.device("meta"):
        return CLIPTextModel(config).eval()


@cache
def _open_clip_module(component: str, size: str) -> nn.Module:
    transformer = open_clip_transformer()
    width, heads, layers, vocab = _OPEN_CLIP[component, size]
    with torch.device("meta"):
        return transformer.TextTransformer(
            context_length=77,
            vocab_size=vocab,
            width=width,
            heads=heads,
            layers=layers,
            mlp_ratio=4.0,
            output_dim=width,
            act_layer=nn.GELU,  # LAION ViT-H / bigG: exact GELU (not QuickGELU)
            pool_type="argmax",
        ).eval()


@cache
def _unet_module(family: str, size: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**_UNET[family, size]).eval()


@contextmanager
def _clip_l(size: str, sd: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    model = _clip_l_module(size)
    # position_ids: an int buffer (arange) that old transformers saved; not a weight.
    position_ids = sd.pop("embeddings.position_ids", None)
    if position_ids is not None and not torch.equal(position_ids.long().flatten(), torch.arange(77)):
        raise ValueError("CLIP-L position_ids is not arange(77)")
    model.embeddings.position_ids = torch.arange(77).expand(1, -1)  # non-persistent buffer
    with _loaded(model, sd, "CLIP-L") as loaded:
        yield loaded


@contextmanager
def _open_clip(component: str, size: str, sd: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    model = _open_clip_module(component, size)
    # logit_scale belongs to the CLIP model (contrastive temperature), not to its text tower.
    logit_scale = sd.pop("logit_scale", None)
    if logit_scale is not None and logit_scale.dim() != 0:
        raise ValueError(f"{component} logit_scale is not a scalar: {tuple(logit_scale.shape)}")
    model.attn_mask = model.build_causal_mask()  # non-persistent buffer
    with _loaded(model, sd, component) as loaded:
        yield loaded


@contextmanager
def _unet(family: str, size: str, sd: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = _unet_module(family, size)
    ldm = {UNET_PREFIX + k: v for k, v in sd.items()}  # the converter wants the LDM prefix
    sd.clear()
    converted = convert_ldm_unet_checkpoint(ldm, unet.config)
    # The converter maps by name and silently drops what it does not know: every input tensor
    # must come out exactly once.
    if len(converted) != len(ldm) or {id(t) for t in converted.values()} != {id(t) for t in ldm.values()}:
        dropped = sorted(k for k, v in ldm.items() if all(v is not c for c in converted.values()))
        raise KeyError(f"UNet converter: {len(ldm)} keys in, {len(converted)} out; dropped {dropped[:10]}")
    ldm.clear()
    with _loaded(unet, converted, "UNet") as loaded:
        yield loaded


# ---------------------------------------------------------------------------------------------
# Inputs and pipelines
# ---------------------------------------------------------------------------------------------
def _token_ids(vocab: int, seed: int, pad: int) -> torch.Tensor:
    """BOS, a fixed pseudo-random prompt, EOS (the largest id, so argmax pooling finds it), pad."""
    gen = torch.Generator().manual_seed(seed)
    bos, eos = vocab - 2, vocab - 1
    prompt = torch.randint(1, vocab - 2, (PROMPT_TOKENS,), generator=gen)
    ids = torch.full((1, 77), pad, dtype=torch.long)
    ids[0, 0] = bos
    ids[0, 1 : 1 + PROMPT_TOKENS] = prompt
    ids[0, 1 + PROMPT_TOKENS] = eos
    return ids


def _open_clip_blocks(model: nn.Module, ids: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Embedding and the first n_blocks residual blocks, as LDM's / SGM's FrozenOpenCLIP*Embedder."""
    x = model.token_embedding(ids) + model.positional_embedding
    for block in model.transformer.resblocks[:n_blocks]:
        x = block(x, attn_mask=model.attn_mask)
    return x


def _sd1_cond(size: str, sd: MutableMapping[str, torch.Tensor], seed: int, consume: bool) -> dict:
    vocab = _CLIP_L[size][4]
    ids = _token_ids(vocab, seed, pad=vocab - 1)  # HF CLIP tokenizer pads with EOS
    with _clip_l(size, _take(sd, PREFIXES["sd1"]["clip_l"], consume)) as model:
        context = model(input_ids=ids).last_hidden_state  # after final_layer_norm
    return {"encoder_hidden_states": context}


def _sd2_cond(size: str, sd: MutableMapping[str, torch.Tensor], seed: int, consume: bool) -> dict:
    vocab = _OPEN_CLIP["clip_h", size][3]
    ids = _token_ids(vocab, seed, pad=0)  # open_clip tokenizer pads with 0
    with _open_clip("clip_h", size, _take(sd, PREFIXES["sd2"]["clip_h"], consume)) as model:
        # FrozenOpenCLIPEmbedder(layer="penultimate"): all blocks but the last, then ln_final.
        x = _open_clip_blocks(model, ids, len(model.transformer.resblocks) - 1)
        return {"encoder_hidden_states": model.ln_final(x)}


def _sdxl_cond(size: str, sd: MutableMapping[str, torch.Tensor], seed: int, consume: bool) -> dict:
    vocab_l = _CLIP_L[size][4]
    ids_l = _token_ids(vocab_l, seed, pad=vocab_l - 1)
    with _clip_l(size, _take(sd, PREFIXES["sdxl"]["clip_l"], consume)) as clip_l:
        # FrozenCLIPEmbedder(layer="hidden", layer_idx=-2): the second-to-last layer's output, no final LN.
        context_l = clip_l(input_ids=ids_l, output_hidden_states=True).hidden_states[-2]

    vocab_g = _OPEN_CLIP["clip_g", size][3]
    ids_g = _token_ids(vocab_g, seed, pad=0)
    with _open_clip("clip_g", size, _take(sd, PREFIXES["sdxl"]["clip_g"], consume)) as clip_g:
        # FrozenOpenCLIPEmbedder2(layer="penultimate", always_return_pooled=True, legacy=False).
        n = len(clip_g.transformer.resblocks)
        penultimate = _open_clip_blocks(clip_g, ids_g, n - 1)
        last = clip_g.transformer.resblocks[n - 1](penultimate, attn_mask=clip_g.attn_mask)
        last = clip_g.ln_final(last)
        pooled = last[torch.arange(last.shape[0]), ids_g.argmax(dim=-1)] @ clip_g.text_projection

    h = w = LATENT_SIZE * IMAGE_SCALE
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)  # original, crop, target
    return {
        "encoder_hidden_states": torch.cat([context_l, penultimate], dim=-1),
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
    }


_CONDITIONING = {"sd1": _sd1_cond, "sd2": _sd2_cond, "sdxl": _sdxl_cond}


def run_model(
    family: str,
    size: str,
    state_dict: MutableMapping[str, torch.Tensor],
    *,
    seed: int = 0,
    consume: bool = False,
) -> torch.Tensor:
    """UNet output (fp32) for fixed seeded prompt tokens, latent and timestep.

    Text encoder(s) run first and are freed before the UNet is loaded; every tensor is cast to
    fp32 once. With consume=True the keys are popped from state_dict as they are used, so that a
    full-size fp16 model never exists twice.
    """
    if (family, size) not in _UNET:
        raise ValueError(f"unknown family/size {family!r}/{size!r}")
    _check_leftovers(family, state_dict)
    with torch.no_grad():
        cond = _CONDITIONING[family](size, state_dict, seed, consume)
        gen = torch.Generator().manual_seed(seed + 1)
        latent = torch.randn((1, 4, LATENT_SIZE, LATENT_SIZE), generator=gen)
        timestep = torch.tensor([TIMESTEP], dtype=torch.long)
        with _unet(family, size, _take(state_dict, UNET_PREFIX, consume)) as unet:
            out = unet(latent, timestep, **cond).sample
    return out.float().clone()


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|a|: the harness's measure of "same function"."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / a.abs().max()).item()


def unet_context(family: str, size: str, seed: int = 0) -> dict:
    """Fixed "text embeddings" for a UNet alone (a UNet-only file has no text encoder): a seeded
    context of the cross-attention width and, for SDXL, a pooled vector and size conditioning."""
    config = _UNET[family, size]
    gen = torch.Generator().manual_seed(seed + 7)
    cond: dict = {"encoder_hidden_states": torch.randn((1, 77, config["cross_attention_dim"]), generator=gen)}
    if family == "sdxl":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        h = w = LATENT_SIZE * IMAGE_SCALE
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn((1, pooled), generator=gen),
            "time_ids": torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32),
        }
    return cond


def run_unet(
    family: str,
    size: str,
    state_dict: MutableMapping[str, torch.Tensor],
    *,
    layout: str = "ldm",
    seed: int = 0,
) -> torch.Tensor:
    """UNet output (fp32) of a UNet alone, for the fixed context of `unet_context`.

    `layout`: "ldm" (LDM names, with or without `model.diffusion_model.`, converted by diffusers'
    converter) or "diffusers" (UNet2DConditionModel names, loaded as they are). The state dict is
    consumed.
    """
    with torch.no_grad():
        cond = unet_context(family, size, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        latent = torch.randn((1, 4, LATENT_SIZE, LATENT_SIZE), generator=gen)
        timestep = torch.tensor([TIMESTEP], dtype=torch.long)
        if layout == "diffusers":
            sd = {k: state_dict.pop(k).to(torch.float32) for k in list(state_dict)}
            with _loaded(_unet_module(family, size), sd, "UNet") as unet:
                out = unet(latent, timestep, **cond).sample
        else:
            sd = {k.removeprefix(UNET_PREFIX): state_dict.pop(k).to(torch.float32) for k in list(state_dict)}
            with _unet(family, size, sd) as unet:
                out = unet(latent, timestep, **cond).sample
    return out.float().clone()
