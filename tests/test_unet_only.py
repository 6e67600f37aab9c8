"""UNet-only models (no text encoder): the permutation group, proved by forward passes, and recovered.

Without the text encoder, its residual stream is not part of the model: the cross-attention
`attn2.to_k` / `attn2.to_v` columns and SDXL's `label_emb.0.0` columns (the pooled text vector)
read inputs from outside and must stay as they are; every other UNet permutation stays legal. The
proofs run diffusers' UNet2DConditionModel on fixed text embeddings, in LDM names (through
diffusers' converter) and in diffusers names (loaded as they are).
"""

from __future__ import annotations

import gc

import pytest
import sd_mecha
import torch
from support import tiny_merge
from support.forward import _UNET, max_rel_error, run_unet
from support.layouts import arch_overrides, key_shapes, random_state_dict

from sd_mecha_rebasin import apply_permutation, permutation_spec, random_permutation, weight_matching
from sd_mecha_rebasin.architectures import present_text_encoders
from sd_mecha_rebasin.mecha.interface import implementation_identifier
from sd_mecha_rebasin.mecha.merge_method import arch_override
from sd_mecha_rebasin.model_configs.unet_only import UNET_ONLY_LAYOUTS, layout_name, unet_only_config
from sd_mecha_rebasin.permutations.spec import permute_tensor

UNET = "model.diffusion_model."
FULL = {"sd1": "sd1-ldm", "sd2": "sd2-ldm", "sdxl": "sdxl-sgm"}
CONFIG = {
    ("sd1", "ldm"): "sd1-ldm_unet_only",
    ("sd2", "ldm"): "sd2-ldm_unet_only",
    ("sdxl", "ldm"): "sdxl-sgm_unet_only",
    ("sd1", "diffusers"): "sd1-diffusers_unet_only",
    ("sd2", "diffusers"): "sd2-diffusers_unet_only",
    ("sdxl", "diffusers"): "sdxl-diffusers_unet_only",
}
LEGAL = 1e-5
ILLEGAL = 1e-3
CASES = sorted(CONFIG)


def unet_shapes(family: str, size: str, names: str) -> dict[str, tuple[int, ...]]:
    """The UNet alone, in bare LDM names or diffusers names."""
    config = CONFIG[family, names]
    return {layout_name(config, k): s for k, s in key_shapes(family, size).items() if k.startswith(UNET)}


def tiny(family: str, names: str):
    shapes = unet_shapes(family, "tiny", names)
    spec = permutation_spec(CONFIG[family, names], arch=arch_overrides(family, "tiny"), shapes=shapes)
    return spec, random_state_dict(shapes, seed=31)


# ------------------------------------------------------------------ layouts and configs


def test_renaming_gives_sd_mecha_and_diffusers_names_exactly():
    """Our LDM -> diffusers rule equals sd-mecha's own SDXL UNet-only config and the state-dict
    names and shapes of diffusers' UNet2DConditionModel for SD1, SD2 and SDXL."""
    from diffusers import UNet2DConditionModel
    from sd_mecha.extensions import model_configs

    theirs = {k: tuple(m.shape) for k, m in model_configs.resolve("sdxl-diffusers_unet_only").keys().items()}
    assert unet_shapes("sdxl", "full", "diffusers") == theirs
    for family in FULL:
        with torch.device("meta"):
            model = UNet2DConditionModel(**_UNET[family, "full"])
        diffusers = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert unet_shapes(family, "full", "diffusers") == diffusers, family


def test_shipped_unet_only_configs_are_generated_from_the_full_ones():
    import importlib.util
    import pathlib

    tool = pathlib.Path(__file__).resolve().parents[1] / "tools" / "make_unet_only_configs.py"
    module_spec = importlib.util.spec_from_file_location("make_unet_only_configs", tool)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    for identifier, layout in UNET_ONLY_LAYOUTS.items():
        if layout.ours:
            assert (module.OUT_DIR / f"{identifier}.yaml").read_text() == module.render(identifier), (
                identifier
            )


@pytest.mark.parametrize("family,names", CASES)
def test_detection_by_layout_and_cross_attention_width(family, names):
    assert unet_only_config(unet_shapes(family, "full", names)) == CONFIG[family, names]
    refiner = {
        k: (s[0], 1280) if k.endswith("attn2.to_k.weight") else s
        for k, s in unet_shapes(family, "full", names).items()
    }
    with pytest.raises(ValueError, match="refiner"):
        unet_only_config(refiner)


@pytest.mark.parametrize("family", sorted(FULL))
def test_unet_only_spec_is_the_full_spec_without_the_text_encoder_couplings(family):
    full = permutation_spec(FULL[family])
    alone = permutation_spec(
        FULL[family], shapes={k: s for k, s in full.shapes.items() if k.startswith(UNET)}
    )
    assert present_text_encoders(FULL[family], alone.shapes) == ()
    outside = (".attn2.to_k.weight", ".attn2.to_v.weight", "label_emb.0.0.weight")
    for key, axes in full.axes.items():
        if not key.startswith(UNET):
            assert key not in alone.axes
            continue
        expected = {a: [s.space for s in segs] for a, segs in axes.items()}
        if key.endswith(outside):
            del expected[1]  # the columns read the text encoder (or its pooled vector): kept
        assert alone.permuted_axes(key) == expected, key
    for names in ("ldm", "diffusers"):
        renamed = permutation_spec(CONFIG[family, names])
        assert len(renamed.axes) == len(alone.axes) and renamed.spaces.keys() == alone.spaces.keys()


# ------------------------------------------------------------------ function preservation


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def tiny_case(request):
    family, names = request.param
    spec, sd = tiny(family, names)
    return family, names, spec, sd, run_unet(family, "tiny", dict(sd), layout=names)


def test_random_legal_unet_only_permutation_preserves_the_unet(tiny_case):
    family, names, spec, sd, reference = tiny_case
    for seed in (0, 1):
        permuted = apply_permutation(spec, random_permutation(spec, seed), sd)
        changed = sum(not permuted[k].equal(sd[k]) for k in spec.axes)
        assert changed > 0.9 * len(spec.axes), "the permutation must actually move the weights"
        assert max_rel_error(reference, run_unet(family, "tiny", permuted, layout=names)) <= LEGAL


@pytest.mark.parametrize("family", sorted(FULL))
def test_permuting_cross_attention_columns_without_the_text_encoder_is_caught(family):
    """The full model's group moves the text stream too; applied to a UNet alone (whose text
    embeddings come from outside) it changes the output: why the UNet-only spec leaves them."""
    shapes = key_shapes(family, "tiny")
    full = permutation_spec(FULL[family], arch=arch_overrides(family, "tiny"), shapes=shapes)
    sd = random_state_dict({k: s for k, s in shapes.items() if k.startswith(UNET)}, seed=31)
    reference = run_unet(family, "tiny", dict(sd))
    perms = random_permutation(full, 3)
    text = {n: p for n, p in perms.items() if full.spaces[n].kind == "text_stream" or n.endswith(".pooled")}
    assert text
    moved = {k: permute_tensor(full, k, v, text) for k, v in sd.items()}
    assert max_rel_error(reference, run_unet(family, "tiny", moved)) > ILLEGAL


FULL_SIZE = [("sd1", "ldm"), ("sd2", "diffusers"), ("sdxl", "diffusers")]


@pytest.mark.full_size
@pytest.mark.parametrize("family,names", FULL_SIZE, ids=lambda c: c)
def test_full_size_unet_only_permutation_preserves_the_unet(family, names):
    shapes = unet_shapes(family, "full", names)
    spec = permutation_spec(CONFIG[family, names], shapes=shapes)
    perms = random_permutation(spec, 0)
    reference = run_unet(family, "full", random_state_dict(shapes, seed=5, dtype=torch.float16), layout=names)
    gc.collect()
    sd = random_state_dict(shapes, seed=5, dtype=torch.float16)
    permuted = {key: permute_tensor(spec, key, sd.pop(key), perms) for key in list(sd)}
    gc.collect()
    assert max_rel_error(reference, run_unet(family, "full", permuted, layout=names)) <= LEGAL


# ------------------------------------------------------------------ recovery


@pytest.mark.parametrize("family,names", CASES, ids=lambda c: c)
def test_hidden_unet_only_permutation_is_recovered(family, names):
    spec, a = tiny(family, names)
    hidden = random_permutation(spec, 11)
    b = apply_permutation(spec, hidden, a)
    result = weight_matching(spec, a, b, max_iter=20, seed=0, threads=1)
    assert result.rel_distance == 0.0
    back = apply_permutation(spec, result.perms, b)
    assert all(torch.equal(back[k], a[k]) for k in a)


@pytest.mark.parametrize("names", ["ldm", "diffusers"])
def test_sd_mecha_rebasin_interface_takes_unet_only_models(tmp_path, names):
    """`sd_mecha.rebasin` on SDXL UNet-only files (sd-mecha's own `sdxl-diffusers_unet_only`, our
    bare-name config) dispatches to our exact implementation and undoes a hidden permutation."""
    from safetensors.torch import save_file

    config = CONFIG["sdxl", names]
    spec, a = tiny("sdxl", names)
    b = apply_permutation(spec, random_permutation(spec, 12), a)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    ref = sd_mecha.model(str(tmp_path / "a.safetensors"), config)
    node = sd_mecha.rebasin(sd_mecha.model(str(tmp_path / "b.safetensors"), config), ref)
    assert node.merge_method.identifier == implementation_identifier(config)
    with arch_override(config, arch_overrides("sdxl", "tiny")):
        out = tiny_merge.merge(node, output_dtype=torch.float32, tqdm=_quiet)
    out.pop("__metadata__", None)
    assert out.keys() == a.keys() and all(torch.equal(out[k], a[k]) for k in a)


def test_git_rebasin_with_a_full_ref_and_a_unet_only_model(tmp_path):
    """`git_rebasin(unet_only, full)`: the full model's text encoder takes no part (the UNet-only
    model has none), so only UNet permutations move and the hidden one is undone."""
    from safetensors.torch import save_file

    import sd_mecha_rebasin

    shapes = key_shapes("sd1", "tiny")
    full = random_state_dict(shapes, seed=2)
    unet = {k: v for k, v in full.items() if k.startswith(UNET)}
    spec = permutation_spec(
        "sd1-ldm", arch=arch_overrides("sd1", "tiny"), shapes={k: tuple(v.shape) for k, v in unet.items()}
    )
    b = apply_permutation(spec, random_permutation(spec, 4), unet)
    save_file(full, str(tmp_path / "full.safetensors"))
    save_file({k[len(UNET) :]: v for k, v in b.items()}, str(tmp_path / "unet.safetensors"))
    node = sd_mecha_rebasin.rebasin(
        sd_mecha.convert(sd_mecha.model(str(tmp_path / "unet.safetensors"), "sd1-ldm_unet_only"), "sd1-ldm"),
        sd_mecha.model(str(tmp_path / "full.safetensors"), "sd1-ldm"),
    )
    with arch_override("sd1-ldm", arch_overrides("sd1", "tiny")):
        out = tiny_merge.merge(node, output_dtype=torch.float32, tqdm=_quiet, strict_mandatory_keys=False)
    out.pop("__metadata__", None)
    assert set(out) == set(unet) and all(torch.equal(out[k], unet[k]) for k in unet)


class _Bar:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *args):
        pass

    def set_postfix(self, *args, **kwargs):
        pass


def _quiet(*args, **kwargs):
    return _Bar()
