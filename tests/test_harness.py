"""The forward-pass harness itself: layouts, determinism, sensitivity, and that it tells legal
permutations (same function) from illegal ones. The permutations are written out by hand with
explicit key names, independently of sd_mecha_rebasin."""

from __future__ import annotations

import re
import resource
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from support.forward import LATENT_SIZE, max_rel_error, run_model
from support.layouts import arch_overrides, key_shapes, random_state_dict

from sd_mecha_rebasin.model_configs.sd_layouts import (
    FAMILIES,
    PREFIXES,
    UNET_PREFIX,
    component_of,
    sd2_full_layout,
)

LEGAL = 1e-5
ILLEGAL = 1e-3

U = UNET_PREFIX
SD1_L = PREFIXES["sd1"]["clip_l"]
SD2_H = PREFIXES["sd2"]["clip_h"]
XL_L = PREFIXES["sdxl"]["clip_l"]
XL_G = PREFIXES["sdxl"]["clip_g"]

_CACHE: dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}


def tiny(family: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A fresh shallow copy of the seed-0 tiny state dict, and its output."""
    if family not in _CACHE:
        sd = random_state_dict(key_shapes(family, "tiny"), seed=0)
        _CACHE[family] = (sd, run_model(family, "tiny", dict(sd)))
    sd, out = _CACHE[family]
    return dict(sd), out


def perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def rows(sd: dict, key: str, idx: torch.Tensor) -> None:
    sd[key] = sd[key][idx]


def cols(sd: dict, key: str, idx: torch.Tensor) -> None:
    sd[key] = sd[key][:, idx]


def cols_range(sd: dict, key: str, start: int, idx: torch.Tensor) -> None:
    """Permute columns [start, start + len(idx)) of a matrix, leaving the others in place."""
    full = torch.arange(sd[key].shape[1])
    full[start : start + len(idx)] = start + idx
    sd[key] = sd[key][:, full]


def block_perm(n_blocks: int, size: int, outer: torch.Tensor, inner: list[torch.Tensor]) -> torch.Tensor:
    """Index that moves whole blocks (outer) and permutes inside each block (inner[i])."""
    return torch.cat([outer[i] * size + inner[i] for i in range(n_blocks)])


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_layout_has_the_full_key_names(family: str) -> None:
    full, small = key_shapes(family, "full"), key_shapes(family, "tiny")
    assert set(small) == set(full)
    for key, shape in full.items():
        assert len(small[key]) == len(shape), key
    assert not [k for k in full if "position_ids" in k]


def test_full_layouts_sizes() -> None:
    counts = {f: sum(torch.Size(s).numel() for s in key_shapes(f, "full").values()) for f in FAMILIES}
    assert 0.95e9 < counts["sd1"] < 1.0e9  # CLIP-L 123 M + UNet 860 M
    assert 1.2e9 < counts["sd2"] < 1.25e9  # OpenCLIP-H 354 M + UNet 866 M
    assert 3.35e9 < counts["sdxl"] < 3.4e9  # CLIP-L + OpenCLIP-G 818 M + UNet 2.57 B
    assert "conditioner.embedders.1.model.text_projection" in key_shapes("sdxl", "full")
    assert "conditioner.embedders.1.model.logit_scale" in key_shapes("sdxl", "full")
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight" in key_shapes(
        "sdxl", "full"
    )


def test_sd2_layout_matches_the_shipped_config() -> None:
    """The sd2-ldm config shipped in the package must describe the same keys and shapes as the
    layout derived here from sd1-ldm and the OpenCLIP ViT-H text tower (read as YAML, not imported)."""
    path = Path(__file__).parents[1] / "sd_mecha_rebasin" / "model_configs" / "sd2-ldm.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["identifier"] == "sd2-ldm"
    shipped = {
        key: tuple(meta["shape"])
        for component in ("clip_h", "diffuser")
        for key, meta in config["components"][component].items()
    }
    assert shipped == sd2_full_layout()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_arch_overrides_fit_the_shapes(family: str, size: str) -> None:
    shapes, arch = key_shapes(family, size), arch_overrides(family, size)
    assert set(arch) == {"unet"} | set(PREFIXES[family]) - {"unet"}
    for component, prefix in PREFIXES[family].items():
        if component == "unet":
            continue
        heads = arch[component]["heads"]
        final_norm = "final_layer_norm.weight" if component == "clip_l" else "ln_final.weight"
        width = shapes[prefix + final_norm][0]
        assert width % heads == 0 and width // heads == 16 * (1 if size == "tiny" else 4), component
    groups = arch["unet"]["groupnorm_groups"]
    for key, shape in shapes.items():
        if key.endswith(("in_layers.0.weight", "out_layers.0.weight", "norm.weight")) and key.startswith(U):
            assert shape[0] % groups == 0, key
        if key.endswith("attn1.to_q.weight"):
            facts = arch["unet"]
            assert shape[0] % facts.get("num_heads", facts.get("head_dim")) == 0, key


# ---------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_forward_is_finite_nontrivial_and_deterministic(family: str) -> None:
    sd, out = tiny(family)
    assert out.shape == (1, 4, LATENT_SIZE, LATENT_SIZE)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std() > 1e-2
    again = run_model(family, "tiny", sd)
    assert torch.equal(out, again)
    assert len(sd) == len(key_shapes(family, "tiny"))  # consume=False leaves the dict alone
    half = {k: v.half() for k, v in sd.items()}
    assert max_rel_error(out, run_model(family, "tiny", half, consume=True)) < 1e-2
    assert not half  # consume=True empties it
    assert max_rel_error(out, run_model(family, "tiny", sd, seed=1)) > 0.1


@pytest.mark.parametrize(
    ("family", "mutate"),
    [
        ("sd1", lambda sd: sd.pop(U + "out.2.bias")),
        ("sd1", lambda sd: sd.pop(SD1_L + "encoder.layers.0.mlp.fc1.bias")),
        ("sd1", lambda sd: sd.__setitem__(U + "extra.weight", torch.zeros(1))),
        ("sd1", lambda sd: sd.__setitem__("somewhere.else", torch.zeros(1))),
        ("sd1", lambda sd: sd.__setitem__(U + "out.2.bias", torch.zeros(5))),
        ("sd2", lambda sd: sd.pop(SD2_H + "transformer.resblocks.23.mlp.c_fc.bias")),
        ("sdxl", lambda sd: sd.__setitem__(XL_G + "text_projection", torch.zeros(96, 95))),
        ("sdxl", lambda sd: sd.pop(U + "label_emb.0.2.weight")),
    ],
)
def test_loading_is_strict(family: str, mutate: Callable[[dict], object]) -> None:
    sd, _ = tiny(family)
    mutate(sd)
    with pytest.raises((KeyError, RuntimeError, ValueError)):
        run_model(family, "tiny", sd)


def test_ignorable_keys_are_accepted() -> None:
    sd, out = tiny("sd1")
    sd[SD1_L + "embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    sd["alphas_cumprod"] = torch.ones(1000)
    sd["first_stage_model.decoder.conv_in.bias"] = torch.zeros(512)
    assert torch.equal(run_model("sd1", "tiny", sd), out)


SENSITIVE = [
    ("sd1", SD1_L + "encoder.layers.5.mlp.fc1.weight"),
    ("sd1", SD1_L + "final_layer_norm.weight"),
    ("sd1", U + "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight"),
    ("sd2", SD2_H + "transformer.resblocks.5.mlp.c_fc.weight"),
    ("sd2", SD2_H + "transformer.resblocks.22.attn.in_proj_weight"),
    ("sd2", SD2_H + "ln_final.bias"),
    ("sd2", U + "output_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"),
    ("sdxl", XL_L + "encoder.layers.5.mlp.fc1.weight"),
    ("sdxl", XL_L + "encoder.layers.10.mlp.fc2.weight"),
    ("sdxl", XL_G + "transformer.resblocks.5.mlp.c_fc.weight"),
    ("sdxl", XL_G + "transformer.resblocks.31.mlp.c_fc.weight"),  # pooled path only
    ("sdxl", XL_G + "ln_final.weight"),  # pooled path only
    ("sdxl", XL_G + "text_projection"),
    ("sdxl", U + "label_emb.0.0.weight"),
    ("sdxl", U + "middle_block.1.transformer_blocks.9.attn2.to_k.weight"),
]

# Keys that real SD2 / SDXL pipelines never read (sd-mecha marks them optional).
UNUSED = [
    ("sd2", SD2_H + "transformer.resblocks.23.mlp.c_fc.weight"),
    ("sd2", SD2_H + "text_projection"),
    ("sd2", SD2_H + "logit_scale"),
    ("sdxl", XL_L + "encoder.layers.11.mlp.fc1.weight"),
    ("sdxl", XL_L + "final_layer_norm.weight"),
    ("sdxl", XL_G + "logit_scale"),
]


def _perturb(t: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(7))
    return t + 0.5 * noise * (t.std() if t.numel() > 1 else 1.0)


@pytest.mark.parametrize(("family", "key"), SENSITIVE)
def test_output_depends_on(family: str, key: str) -> None:
    sd, out = tiny(family)
    sd[key] = _perturb(sd[key])
    assert max_rel_error(out, run_model(family, "tiny", sd)) > 1e-4


@pytest.mark.parametrize(("family", "key"), UNUSED)
def test_output_ignores_unused(family: str, key: str) -> None:
    sd, out = tiny(family)
    sd[key] = _perturb(sd[key])
    assert torch.equal(run_model(family, "tiny", sd), out)


# ---------------------------------------------------------------------------------------------
# Hand-made permutations (tiny widths: CLIP-L 64 = 4 x 16, MLP 256; OpenCLIP-H 64 = 4 x 16;
# OpenCLIP-G 96 = 6 x 16; UNet channels 32/64/128, GroupNorm 8 groups, GEGLU inner 4 C)
# ---------------------------------------------------------------------------------------------
def clip_l_mlp(sd: dict, layer: str) -> None:
    p = perm(256, 1)
    rows(sd, layer + "mlp.fc1.weight", p)
    rows(sd, layer + "mlp.fc1.bias", p)
    cols(sd, layer + "mlp.fc2.weight", p)


def geglu(sd: dict, block: str, independent_halves: bool = False) -> None:
    ff = block + "ff.net."
    inner = sd[ff + "2.weight"].shape[1]
    p = perm(inner, 2)
    gate = perm(inner, 3) if independent_halves else p
    idx = torch.cat([p, inner + gate])
    rows(sd, ff + "0.proj.weight", idx)
    rows(sd, ff + "0.proj.bias", idx)
    cols(sd, ff + "2.weight", p)


def unet_heads(sd: dict, attn: str, heads: int, across_heads: bool = False) -> None:
    """Legal: whole heads moved together in q, k, v, out; within heads one permutation for q/k
    and another for v/out. Illegal (across_heads): one q/k row permutation ignoring heads."""
    width = sd[attn + "to_q.weight"].shape[0]
    hd = width // heads
    outer = perm(heads, 4)
    qk = block_perm(heads, hd, outer, [perm(hd, 10 + i) for i in range(heads)])
    vo = block_perm(heads, hd, outer, [perm(hd, 30 + i) for i in range(heads)])
    if across_heads:
        qk, vo = perm(width, 5), torch.arange(width)
        assert (qk // hd != torch.arange(width) // hd).any()
    rows(sd, attn + "to_q.weight", qk)
    rows(sd, attn + "to_k.weight", qk)
    rows(sd, attn + "to_v.weight", vo)
    cols(sd, attn + "to_out.0.weight", vo)


def open_clip_heads(sd: dict, block: str, heads: int) -> None:
    """The same head symmetry on OpenCLIP's fused in_proj (rows q, then k, then v)."""
    width = sd[block + "attn.out_proj.weight"].shape[0]
    hd = width // heads
    outer = perm(heads, 6)
    qk = block_perm(heads, hd, outer, [perm(hd, 50 + i) for i in range(heads)])
    vo = block_perm(heads, hd, outer, [perm(hd, 70 + i) for i in range(heads)])
    idx = torch.cat([qk, width + qk, 2 * width + vo])
    rows(sd, block + "attn.in_proj_weight", idx)
    rows(sd, block + "attn.in_proj_bias", idx)
    cols(sd, block + "attn.out_proj.weight", vo)


def resblock_inner(sd: dict, block: str, groups: int, across_groups: bool = False) -> None:
    """ResBlock hidden channels: in_layers.2 rows, emb_layers.1 rows, out_layers.0 GroupNorm,
    out_layers.3 columns. Legal: whole groups moved and shuffled inside; illegal: any shuffle."""
    channels = sd[block + "in_layers.2.weight"].shape[0]
    size = channels // groups
    p = block_perm(groups, size, perm(groups, 8), [perm(size, 90 + i) for i in range(groups)])
    if across_groups:
        p = perm(channels, 9)
        assert (p // size != torch.arange(channels) // size).any()
    for key in (
        "in_layers.2.weight",
        "in_layers.2.bias",
        "emb_layers.1.weight",
        "emb_layers.1.bias",
        "out_layers.0.weight",
        "out_layers.0.bias",
    ):
        rows(sd, block + key, p)
    cols(sd, block + "out_layers.3.weight", p)


def clip_l_stream(sd: dict, prefix: str, p: torch.Tensor) -> None:
    """CLIP-L residual stream: from the embeddings to final_layer_norm."""
    cols(sd, prefix + "embeddings.token_embedding.weight", p)
    cols(sd, prefix + "embeddings.position_embedding.weight", p)
    for i in range(12):
        layer = f"{prefix}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            rows(sd, f"{layer}{norm}.weight", p)
            rows(sd, f"{layer}{norm}.bias", p)
        for proj in ("q_proj", "k_proj", "v_proj"):
            cols(sd, f"{layer}self_attn.{proj}.weight", p)
        rows(sd, layer + "self_attn.out_proj.weight", p)
        rows(sd, layer + "self_attn.out_proj.bias", p)
        cols(sd, layer + "mlp.fc1.weight", p)
        rows(sd, layer + "mlp.fc2.weight", p)
        rows(sd, layer + "mlp.fc2.bias", p)
    rows(sd, prefix + "final_layer_norm.weight", p)
    rows(sd, prefix + "final_layer_norm.bias", p)


def open_clip_stream(sd: dict, prefix: str, layers: int, p: torch.Tensor) -> None:
    """OpenCLIP residual stream: embeddings to ln_final, and text_projection rows (x @ W)."""
    cols(sd, prefix + "token_embedding.weight", p)
    cols(sd, prefix + "positional_embedding", p)
    for i in range(layers):
        block = f"{prefix}transformer.resblocks.{i}."
        for norm in ("ln_1", "ln_2"):
            rows(sd, f"{block}{norm}.weight", p)
            rows(sd, f"{block}{norm}.bias", p)
        cols(sd, block + "attn.in_proj_weight", p)
        rows(sd, block + "attn.out_proj.weight", p)
        rows(sd, block + "attn.out_proj.bias", p)
        cols(sd, block + "mlp.c_fc.weight", p)
        rows(sd, block + "mlp.c_proj.weight", p)
        rows(sd, block + "mlp.c_proj.bias", p)
    rows(sd, prefix + "ln_final.weight", p)
    rows(sd, prefix + "ln_final.bias", p)
    rows(sd, prefix + "text_projection", p)


def unet_context(sd: dict, start: int, p: torch.Tensor) -> None:
    """Every cross-attention k/v projection reads the text stream: columns [start, start + n)."""
    keys = [k for k in sd if re.search(r"\.attn2\.to_[kv]\.weight$", k)]
    assert len(keys) == 2 * 16 or len(keys) == 2 * 70  # SD1/SD2: 16 transformers, SDXL: 70
    for key in keys:
        cols_range(sd, key, start, p)


def sd1_legal_mlp_geglu(sd: dict) -> None:
    clip_l_mlp(sd, SD1_L + "encoder.layers.3.")
    geglu(sd, U + "input_blocks.1.1.transformer_blocks.0.")


def sd1_legal_heads_groups(sd: dict) -> None:
    unet_heads(sd, U + "input_blocks.4.1.transformer_blocks.0.attn1.", heads=8)
    unet_heads(sd, U + "output_blocks.11.1.transformer_blocks.0.attn2.", heads=8)
    resblock_inner(sd, U + "input_blocks.1.0.", groups=8)
    resblock_inner(sd, U + "output_blocks.5.0.", groups=8)


def sd1_legal_text_stream(sd: dict) -> None:
    p = perm(64, 11)
    clip_l_stream(sd, SD1_L, p)
    unet_context(sd, 0, p)


def sd2_legal(sd: dict) -> None:
    open_clip_heads(sd, SD2_H + "transformer.resblocks.4.", heads=4)
    unet_heads(sd, U + "middle_block.1.transformer_blocks.0.attn1.", heads=16)  # head_dim 8
    p = perm(64, 12)
    open_clip_stream(sd, SD2_H, 24, p)
    unet_context(sd, 0, p)


def sdxl_legal(sd: dict) -> None:
    # context = cat(CLIP-L 64, OpenCLIP-G 96): a block-diagonal permutation of the UNet's columns.
    p_l, p_g = perm(64, 13), perm(96, 14)
    clip_l_stream(sd, XL_L, p_l)
    open_clip_stream(sd, XL_G, 32, p_g)
    unet_context(sd, 0, p_l)
    unet_context(sd, 64, p_g)
    # pooled: text_projection output columns feed label_emb.0.0 columns [0, 96)
    q = perm(96, 15)
    cols(sd, XL_G + "text_projection", q)
    cols_range(sd, U + "label_emb.0.0.weight", 0, q)
    open_clip_heads(sd, XL_G + "transformer.resblocks.30.", heads=6)
    geglu(sd, U + "middle_block.1.transformer_blocks.3.")
    unet_heads(sd, U + "input_blocks.7.1.transformer_blocks.1.attn1.", heads=16)
    resblock_inner(sd, U + "output_blocks.2.0.", groups=8)


LEGAL_CASES = {
    "sd1-clip_mlp+geglu": ("sd1", sd1_legal_mlp_geglu),
    "sd1-heads+groups": ("sd1", sd1_legal_heads_groups),
    "sd1-clip_stream+attn2_columns": ("sd1", sd1_legal_text_stream),
    "sd2-heads+openclip_stream": ("sd2", sd2_legal),
    "sdxl-streams+pooled+heads": ("sdxl", sdxl_legal),
}

ILLEGAL_CASES = {
    "geglu-halves-independent": (
        "sd1",
        lambda sd: geglu(sd, U + "input_blocks.1.1.transformer_blocks.0.", independent_halves=True),
    ),
    "qk-rows-across-heads": (
        "sd1",
        lambda sd: unet_heads(sd, U + "input_blocks.4.1.transformer_blocks.0.attn1.", 8, across_heads=True),
    ),
    "sdxl-qk-rows-across-heads": (
        "sdxl",
        lambda sd: unet_heads(sd, U + "input_blocks.4.1.transformer_blocks.0.attn1.", 8, across_heads=True),
    ),
    "groupnorm-across-groups": (
        "sd1",
        lambda sd: resblock_inner(sd, U + "input_blocks.1.0.", groups=8, across_groups=True),
    ),
    "clip_stream-without-unet": ("sd1", lambda sd: clip_l_stream(sd, SD1_L, perm(64, 11))),
    "openclip_stream-without-unet": ("sd2", lambda sd: open_clip_stream(sd, SD2_H, 24, perm(64, 12))),
    "sdxl-text_projection-without-label_emb": (
        "sdxl",
        lambda sd: cols(sd, XL_G + "text_projection", perm(96, 15)),
    ),
}


@pytest.mark.parametrize("case", LEGAL_CASES)
def test_legal_permutation_keeps_the_function(case: str) -> None:
    family, apply = LEGAL_CASES[case]
    sd, out = tiny(family)
    before = dict(sd)
    apply(sd)
    changed = [k for k in sd if sd[k] is not before[k]]
    assert changed and all(not torch.equal(sd[k], before[k]) for k in changed)
    assert {component_of(family, k) for k in changed} >= {"unet"}
    assert max_rel_error(out, run_model(family, "tiny", sd)) <= LEGAL


@pytest.mark.parametrize("case", ILLEGAL_CASES)
def test_illegal_permutation_changes_the_function(case: str) -> None:
    family, apply = ILLEGAL_CASES[case]
    sd, out = tiny(family)
    apply(sd)
    assert max_rel_error(out, run_model(family, "tiny", sd)) > ILLEGAL


# ---------------------------------------------------------------------------------------------
# Full size (CI): the real SD1 architecture with random weights
# ---------------------------------------------------------------------------------------------
@pytest.mark.full_size
def test_full_sd1_forward() -> None:
    start = time.perf_counter()
    sd = random_state_dict(key_shapes("sd1", "full"), seed=0, dtype=torch.float16)
    out = run_model("sd1", "full", sd, consume=True)
    elapsed = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"full SD1: {elapsed:.1f} s, process peak RSS {peak_gb:.2f} GB")
    assert not sd
    assert out.shape == (1, 4, LATENT_SIZE, LATENT_SIZE)
    assert torch.isfinite(out).all() and out.std() > 1e-2


def test_layout_lookups_refuse_unknown_names() -> None:
    assert component_of("sdxl", XL_G + "ln_final.weight") == "clip_g"
    with pytest.raises(KeyError, match="belongs to no sd1 component"):
        component_of("sd1", "first_stage_model.encoder.conv_in.weight")
    with pytest.raises(ValueError, match="unknown family 'sd3'"):
        component_of("sd3", U + "out.2.weight")
