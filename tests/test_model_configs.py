"""The shipped sd2-ldm config: shapes, registration, and what sd-mecha 1.1.8 does with it.

Detection and merging go through sd-mecha's own code paths (``sd_mecha.open_graph`` /
``sd_mecha.merge``) on tiny safetensors files: sd-mecha matches configs by key names only and never
checks shapes, so every tensor here is a placeholder of a few elements.
"""

from __future__ import annotations

import importlib.util
import logging
import pathlib

import pytest
import sd_mecha
import torch
from safetensors.torch import load_file, save_file
from sd_mecha.extensions import model_configs as mecha_configs
from sd_mecha.extensions.builtin import model_configs as mecha_builtin_configs
from support import tiny_merge

from sd_mecha_rebasin import model_configs as rb_configs

REPO = pathlib.Path(__file__).resolve().parents[1]
CLIP_H = "cond_stage_model.model."


@pytest.fixture(scope="module", autouse=True)
def _registered():
    rb_configs.register_model_configs()


def _config(identifier: str):
    return mecha_configs.resolve(identifier)


def _keys(identifier: str, *, required_only: bool = False) -> list[str]:
    return [k for k, m in _config(identifier).keys().items() if not (required_only and m.optional)]


def _write(path: pathlib.Path, keys, make=None) -> pathlib.Path:
    make = make or (lambda i, k: torch.full((2,), float(i)))
    save_file({k: make(i, k) for i, k in enumerate(keys)}, str(path))
    return path


def _detect(path: pathlib.Path) -> str:
    """The config sd-mecha picks for a file when none is given (what sd_mecha.merge would use)."""
    with sd_mecha.open_graph(sd_mecha.model(path)) as graph:
        root = graph.finalize_root(merge_space="weight", check_extra_keys=False, check_mandatory_keys=False)
    return root.model_config.identifier


def _merge_to_file(recipe, out: pathlib.Path, **kwargs) -> dict[str, torch.Tensor]:
    tiny_merge.merge(recipe, output=out, threads=0, tqdm=_quiet_tqdm, **kwargs)
    return load_file(str(out))


def _quiet_tqdm(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, disable=True, **kwargs)


# --------------------------------------------------------------------------- the YAML itself


def test_yaml_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_sd2_config", REPO / "tools" / "make_sd2_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run `python tools/make_sd2_config.py` to regenerate sd2-ldm.yaml"


def test_sd2_config_shapes():
    sd1, sd2 = _config("sd1-ldm"), _config("sd2-ldm")
    assert list(sd2.components()) == ["clip_h", "vae", "diffuser", "ema", "scheduler"]
    comps1, comps2 = sd1.components(), sd2.components()

    for name in ("vae", "scheduler"):
        assert comps2[name].keys() == comps1[name].keys(), name

    d1, d2 = comps1["diffuser"].keys(), comps2["diffuser"].keys()
    assert list(d1) == list(d2)
    changed = {k for k in d1 if d1[k] != d2[k]}
    assert len(changed) == 16 * 4  # 16 SpatialTransformers x (proj_in, proj_out, to_k, to_v)
    for k in changed:
        s1, s2 = list(d1[k].shape), list(d2[k].shape)
        if k.endswith((".proj_in.weight", ".proj_out.weight")):
            assert s1 == s2 + [1, 1] and s2[0] == s2[1], k
        else:
            assert k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")), k
            assert s1[1] == 768 and s2 == [s1[0], 1024], k

    clip = comps2["clip_h"].keys()
    assert all(k.startswith(CLIP_H) for k in clip)
    assert len(clip) == 6 + 24 * 12
    assert list(clip[CLIP_H + "token_embedding.weight"].shape) == [49408, 1024]
    assert list(clip[CLIP_H + "positional_embedding"].shape) == [77, 1024]
    assert list(clip[CLIP_H + "transformer.resblocks.0.attn.in_proj_weight"].shape) == [3072, 1024]
    assert list(clip[CLIP_H + "transformer.resblocks.0.mlp.c_proj.weight"].shape) == [1024, 4096]
    assert list(clip[CLIP_H + "logit_scale"].shape) == []
    optional = {k for k, m in clip.items() if m.optional}
    assert optional == {CLIP_H + "text_projection", CLIP_H + "logit_scale"} | {
        k for k in clip if k.startswith(CLIP_H + "transformer.resblocks.23.")
    }
    assert {m.dtype for m in clip.values()} == {torch.float32}

    # EMA mirrors the SD2 UNet, all optional, same key names and aliases as sd1-ldm's
    e1, e2 = comps1["ema"].keys(), comps2["ema"].keys()
    assert list(e1) == list(e2) and all(m.optional for m in e2.values())
    assert all(tuple(e1[k].aliases) == tuple(e2[k].aliases) for k in e1)
    flat = "model_ema.diffusion_modelinput_blocks11proj_inweight"
    assert list(e2[flat].shape) == list(d2["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape)


# --------------------------------------------------------------------------- registration


def test_register_is_idempotent():
    first = _config("sd2-ldm")
    n = len(mecha_configs.get_all())
    ours = [
        "sd1-diffusers_unet_only",
        "sd1-ldm_unet_only",
        "sd2-diffusers_unet_only",
        "sd2-ldm",
        "sd2-ldm_unet_only",
        "sdxl-sgm_unet_only",
    ]
    assert rb_configs.register_model_configs() == ours
    assert rb_configs.register_model_configs() == ours
    assert _config("sd2-ldm") is first
    assert len(mecha_configs.get_all()) == n
    assert pathlib.Path(first.yaml_config_file).parent == rb_configs.YAML_DIRECTORY


def test_register_never_overwrites_a_foreign_config(monkeypatch):
    foreign = mecha_configs.YamlModelConfig(mecha_builtin_configs.yaml_directory / "sd1-ldm.yaml")
    foreign._identifier = "sd2-ldm"
    monkeypatch.setitem(mecha_configs._model_configs_registry_base, "sd2-ldm", foreign)
    with pytest.raises(RuntimeError, match="already has a model config 'sd2-ldm'"):
        rb_configs.register_model_configs()
    assert mecha_configs.resolve("sd2-ldm") is foreign


# --------------------------------------------------------------------------- detection by sd-mecha


@pytest.mark.parametrize(
    ("identifier", "required_only"),
    [
        ("sd1-ldm", False),
        ("sd1-ldm", True),
        ("sd2-ldm", False),
        ("sd2-ldm", True),  # optional keys (text_projection, logit_scale, resblocks.23, EMA, ...) missing
        ("sdxl-sgm", False),
        ("sdxl-sgm", True),
    ],
)
def test_detection(tmp_path, identifier, required_only):
    path = _write(tmp_path / "m.safetensors", _keys(identifier, required_only=required_only))
    assert _detect(path) == identifier


def test_sd2_release_file_without_ema_or_unused_keys(tmp_path):
    """Typical v2-1_768-ema-pruned layout: no model_ema, no scheduler buffers, text_projection kept."""
    keys = [k for k in _keys("sd2-ldm") if not k.startswith("model_ema.")]
    keys = [k for k in keys if k not in _config("sd2-ldm").components()["scheduler"].keys()]
    keys = [k for k in keys if not k.endswith("logit_scale")]
    assert _detect(_write(tmp_path / "m.safetensors", keys)) == "sd2-ldm"


def test_unet_only_files_are_ambiguous_and_go_to_sd2(tmp_path):
    """sd-mecha quirk: a key set common to sd1-ldm and sd2-ldm ties, and the tie goes to the identifier
    that sorts last. After registration a UNet-only SD1 file is taken for sd2-ldm by name matching;
    sd1_or_sd2_from_shapes settles it from the shapes (pass config= explicitly)."""
    unet = [k for k in _keys("sd1-ldm") if k.startswith("model.diffusion_model.")]
    assert _detect(_write(tmp_path / "m.safetensors", unet)) == "sd2-ldm"

    for identifier in ("sd1-ldm", "sd2-ldm"):
        shapes = {k: m.shape for k, m in _config(identifier).keys().items() if k in set(unet)}
        assert rb_configs.sd1_or_sd2_from_shapes(shapes) == identifier
    assert (
        rb_configs.sd1_or_sd2_from_shapes({"first_stage_model.encoder.conv_in.weight": [128, 3, 3, 3]})
        is None
    )


# --------------------------------------------------------------------------- what sd_mecha.merge does


def test_merge_keeps_clip_h_and_drops_unknown_keys(tmp_path, caplog):
    cfg = _config("sd2-ldm")
    required = _keys("sd2-ldm", required_only=True)
    missing_required = "model.diffusion_model.out.2.bias"
    present_optional = [CLIP_H + "text_projection", CLIP_H + "transformer.resblocks.23.ln_1.weight"]
    keys = [k for k in required if k != missing_required] + present_optional + ["some.unknown.key"]
    src = _write(tmp_path / "sd2.safetensors", keys)

    with caplog.at_level(logging.WARNING):
        out = _merge_to_file(sd_mecha.model(src, config="sd2-ldm"), tmp_path / "out.safetensors")

    clip_in = {k for k in keys if k.startswith(CLIP_H)}
    assert {k for k in out if k.startswith(CLIP_H)} == clip_in  # text encoder kept, incl. optional keys
    assert "some.unknown.key" not in out  # unknown keys: warned about, then dropped
    assert "Extra keys (1): some.unknown.key" in caplog.text
    assert missing_required not in out  # missing required key: silently skipped (strict_mandatory_keys=False)
    assert set(out) == set(keys) - {"some.unknown.key"}
    # no shape checks: 2-element placeholders pass although the config says [1024, 1024]
    assert list(cfg.keys()[CLIP_H + "text_projection"].shape) == [1024, 1024]
    assert out[CLIP_H + "text_projection"].shape == (2,)
    # merge's default output_dtype is float16
    assert out[CLIP_H + "positional_embedding"].dtype == torch.float16
    assert torch.equal(out[required[3]], torch.full((2,), 3.0, dtype=torch.float16))

    # with strict_mandatory_keys=True the missing required key is an error at graph finalization
    with pytest.raises(TypeError, match="missing required keys"):
        tiny_merge.merge(
            sd_mecha.model(src, config="sd2-ldm"), strict_mandatory_keys=True, threads=0, tqdm=_quiet_tqdm
        )


def test_merge_of_two_sd2_files_autodetects_sd2(tmp_path):
    keys = _keys("sd2-ldm", required_only=True)
    a = _write(tmp_path / "a.safetensors", keys)
    b = _write(tmp_path / "b.safetensors", keys, make=lambda i, k: torch.full((2,), 3.0 * i))
    recipe = sd_mecha.weighted_sum(sd_mecha.model(a), sd_mecha.model(b), alpha=0.5)
    out = _merge_to_file(recipe, tmp_path / "out.safetensors", output_dtype=torch.float32)
    assert set(out) == set(keys)  # clip_h kept: sd2-ldm was inferred (sd1-ldm would drop it)
    i = keys.index(CLIP_H + "token_embedding.weight")
    assert torch.equal(out[CLIP_H + "token_embedding.weight"], torch.full((2,), 2.0 * i))


def test_sd2_file_read_as_sd1_loses_its_text_encoder(tmp_path, caplog):
    """Why the config is needed: read as sd1-ldm (sd-mecha's pick without sd2-ldm), clip_h is dropped."""
    src = _write(tmp_path / "sd2.safetensors", _keys("sd2-ldm", required_only=True))
    with caplog.at_level(logging.WARNING):
        out = _merge_to_file(sd_mecha.model(src, config="sd1-ldm"), tmp_path / "out.safetensors")
    assert not any(k.startswith("cond_stage_model.") for k in out)
    assert any(k.startswith("model.diffusion_model.") for k in out)


def test_spec_facts_follow_the_cross_attention_width():
    """The permutation spec takes SD1's or SD2's facts (8 heads, or heads 64 wide) from the shapes,
    whichever of the two names it is given: a file sd-mecha took for the other one by key names
    must not be permuted across heads."""
    from sd_mecha_rebasin import permutation_spec
    from sd_mecha_rebasin.architectures import config_shapes

    for identifier in ("sd1-ldm", "sd2-ldm"):
        shapes = config_shapes(identifier)
        other = "sd2-ldm" if identifier == "sd1-ldm" else "sd1-ldm"
        assert permutation_spec(other, shapes=shapes).describe(verbose=True) == permutation_spec(
            identifier, shapes=shapes
        ).describe(verbose=True)
    sd1 = permutation_spec("sd1-ldm", shapes=config_shapes("sd1-ldm")).describe(verbose=True)
    assert sd1 != permutation_spec("sd2-ldm", shapes=config_shapes("sd2-ldm")).describe(verbose=True)
