"""Other tools' key layouts read as canonical (files/key_layouts.py) and the keys other tools add
(files/key_kinds.py): values asserted, refusals in one line."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support import quirks, tiny_merge
from support.layouts import arch_overrides, key_shapes, random_state_dict
from support.quirks import SD1_CLIP, UNET

from sd_mecha_rebasin.cli.commands import main
from sd_mecha_rebasin.cli.jobs import RunOptions, run
from sd_mecha_rebasin.common.errors import UserError
from sd_mecha_rebasin.files import key_kinds, key_layouts, sd_mecha_formats
from sd_mecha_rebasin.files.checkpoint import detect_family, open_checkpoint

G = quirks.SDXL_CLIP_G
H = quirks.SD2_CLIP_H
VAE = {
    "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3),
    "first_stage_model.decoder.conv_in.bias": (8,),
}


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1, err
    assert len(lines) == 1 and lines[0].startswith("sd-rebasin: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tiny(family: str, seed: int) -> dict[str, torch.Tensor]:
    """A tiny canonical model of `family` with a small VAE fragment."""
    sd = random_state_dict(key_shapes(family, "tiny"), seed)
    sd.update(random_state_dict(VAE, seed))
    return sd


def tiny_options(family: str, **kw) -> RunOptions:
    shapes = {**key_shapes(family, "tiny"), **VAE}
    return RunOptions(
        threads=1,
        iters=2,
        quiet=True,
        output_dtype="fp32",
        shapes=shapes,
        arch=arch_overrides(family, "tiny"),
        **kw,
    )


def permutation_spec_of_sd2_tiny_without_last_layer() -> dict:
    from sd_mecha_rebasin.architectures import permutation_spec

    shapes = {k: v for k, v in key_shapes("sd2", "tiny").items() if ".resblocks.23." not in k}
    return permutation_spec("sd2-ldm", arch=arch_overrides("sd2", "tiny"), shapes=shapes).spaces


def read_all(path: pathlib.Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    return dict(ckpt.iter_tensors(list(ckpt.shapes)))


def sd_mecha_read(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from sd_mecha.extensions import model_formats

    (fmt,) = [f for f in model_formats.get_all() if f.matches(path)]  # one format per file kind
    reader = fmt.get_read_dict(path, 1 << 20)
    try:
        return {k: reader[k] for k in reader.keys()}
    finally:
        reader.close()


def assert_equal_dicts(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


# --------------------------------------------------------------------------------------------
# Part 3: layouts


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_forge_layout_reads_the_canonical_tensors(tmp_path, family):
    sd = tiny(family, 0)
    forge = quirks.to_forge(sd)
    assert not any(k.startswith((G, H, "first_stage_model.")) for k in forge)
    path = quirks.save(tmp_path / "forge.safetensors", forge, metadata=None)
    ckpt = open_checkpoint(path)
    assert ckpt.layout is not None and key_layouts.FORGE in ckpt.layout.names
    assert detect_family(ckpt) == {"sdxl": "sdxl-sgm", "sd2": "sd2-ldm"}[family]
    assert_equal_dicts(read_all(path), sd)  # every tensor back under its canonical name, exactly
    assert_equal_dicts(sd_mecha_read(path), sd)  # sd-mecha reads the same
    prefix = G if family == "sdxl" else H
    layer = "text_encoders.clip_{}.transformer.text_model.encoder.layers.0.self_attn.".format(
        "g" if family == "sdxl" else "h"
    )
    fused = read_all(path)[prefix + "transformer.resblocks.0.attn.in_proj_weight"]
    parts = [forge[layer + f"{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(fused, torch.cat(parts, dim=0))
    assert torch.equal(read_all(path)[prefix + "text_projection"], forge[
        f"text_encoders.clip_{'g' if family == 'sdxl' else 'h'}.transformer.text_projection.weight"
    ].t())  # fmt: skip
    described = ckpt.layout.describe()
    assert described["fused"] == 2 * (32 if family == "sdxl" else 24)
    assert described["transposed"] == 1 and described["dropped"] == 0


def test_forge_sdxl_merge_equals_the_canonical_merge(tmp_path):
    a, b = tiny("sdxl", 0), tiny("sdxl", 1)
    ca = quirks.save(tmp_path / "A.safetensors", a, metadata=None)
    cb = quirks.save(tmp_path / "B.safetensors", b, metadata=None)
    fa = quirks.save(tmp_path / "fA.safetensors", quirks.to_forge(a), metadata=None)
    fb = quirks.save(tmp_path / "fB.safetensors", quirks.to_forge(b), metadata=None)
    canonical = run("merge", ca, cb, tmp_path / "c.safetensors", tiny_options("sdxl"))
    forge = run("merge", fa, fb, tmp_path / "f.safetensors", tiny_options("sdxl"))
    assert canonical.perms.keys() == forge.perms.keys()
    for name in canonical.perms:
        assert list(canonical.perms[name]) == list(forge.perms[name]), name
    expected, got = load_file(str(tmp_path / "c.safetensors")), load_file(str(tmp_path / "f.safetensors"))
    assert_equal_dicts(got, expected)  # canonical keys out, the same values
    assert any(k.startswith(G + "transformer.resblocks.") for k in got)


def test_wrapper_segments_are_removed(tmp_path):
    """`_orig_mod.` (torch.compile) at the start and after the UNet prefix, `module.` (DDP) after a
    text-encoder prefix: read as canonical, and the average equals the canonical files' average."""
    a, b = quirks.small_pair()

    def wrapped(sd):
        out = {}
        for k, v in sd.items():
            if k.startswith(UNET):
                k = "_orig_mod." + UNET + "_orig_mod." + k[len(UNET) :]
            elif k.startswith("cond_stage_model."):
                k = "cond_stage_model.module." + k[len("cond_stage_model.") :]
            out[k] = v
        return out

    paths = {}
    for name, sd in {"a": a, "b": b, "wa": wrapped(a), "wb": wrapped(b)}.items():
        paths[name] = quirks.save(tmp_path / f"{name}.safetensors", sd)
    ckpt = open_checkpoint(paths["wa"])
    assert ckpt.layout is not None and ckpt.layout.names == [key_layouts.WRAPPER_LAYOUT]
    assert ckpt.layout.renamed == len(a) - sum(1 for k in a if not k.startswith((UNET, "cond_stage_model.")))
    assert_equal_dicts(read_all(paths["wa"]), a)
    opts = RunOptions(threads=1, quiet=True, output_dtype="fp32")
    run("average", paths["a"], paths["b"], tmp_path / "c.safetensors", opts)
    run("average", paths["wa"], paths["wb"], tmp_path / "w.safetensors", opts)
    assert_equal_dicts(load_file(str(tmp_path / "w.safetensors")), load_file(str(tmp_path / "c.safetensors")))


@pytest.mark.parametrize("where", [G, "conditioner.embedders.1.transformer."])
def test_sdxl_clip_g_in_hugging_face_layout(tmp_path, where):
    sd = tiny("sdxl", 0)
    hf = quirks.openclip_to_hf(sd, G, where)
    path = quirks.save(tmp_path / "hf.safetensors", hf, metadata=None)
    ckpt = open_checkpoint(path)
    assert ckpt.layout is not None and key_layouts.HF_OPENCLIP in ckpt.layout.names
    assert_equal_dicts(read_all(path), sd)


def test_sd2_in_hugging_face_layout_under_the_clip_prefix(tmp_path):
    """SD2's OpenCLIP-H in transformers' layout under `cond_stage_model.transformer.` (width 1024 at
    full size: told from SD1's CLIP-L by its width); here at full width on the token embedding only."""
    sd = tiny("sd2", 0)
    hf = quirks.openclip_to_hf(sd, H, "cond_stage_model.transformer.")
    shapes = {k: tuple(v.shape) for k, v in hf.items()}
    dtypes = {k: v.dtype for k, v in hf.items()}
    token = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    shapes[token] = (1000, 1024)
    layout = key_layouts.plan(tmp_path / "x.safetensors", shapes, dtypes)
    assert H + "token_embedding.weight" in layout.shapes
    assert H + "transformer.resblocks.23.attn.in_proj_weight" in layout.shapes
    assert not any(k.startswith("cond_stage_model.transformer.") for k in layout.shapes)


@pytest.mark.parametrize("hf", [True, False])
def test_sd2_with_23_text_layers_is_read_and_said(tmp_path, capsys, hf):
    """SD2 saved through diffusers: 23 text layers (SD2 never runs the 24th). Read as it is, one note,
    the merge has 23 layers and the right values; 22 layers are refused (never made up)."""
    models = []
    for seed in (0, 1):
        sd = {k: v for k, v in tiny("sd2", seed).items() if ".resblocks.23." not in k}
        models.append(sd)
    files = []
    for name, sd in zip("AB", models):
        stored = quirks.openclip_to_hf(sd, H, "text_encoders.clip_h.transformer.") if hf else sd
        files.append(quirks.save(tmp_path / f"{name}.safetensors", stored, metadata=None))
    opts = dataclasses.replace(tiny_options("sd2"), quiet=False, progress=False)
    run("average", files[0], files[1], tmp_path / "o.safetensors", opts)
    notes = [line for line in capsys.readouterr().err.splitlines() if "23 layers" in line]
    assert len(notes) == 2 and all("diffusers" in n and "not 24" in n for n in notes), notes
    out = load_file(str(tmp_path / "o.safetensors"))
    assert not any(".resblocks.23." in k for k in out)
    key = H + "transformer.resblocks.22.attn.in_proj_weight"
    assert torch.equal(out[key], torch.lerp(models[0][key], models[1][key], 0.5))
    if not hf:  # re-basin too: the spec follows the 23 layers present
        result = run("merge", files[0], files[1], tmp_path / "m.safetensors", tiny_options("sd2"))
        assert result.permutations == len(permutation_spec_of_sd2_tiny_without_last_layer())
        assert not any(".resblocks.23." in k for k in load_file(str(tmp_path / "m.safetensors")))
    short = {k: v for k, v in models[0].items() if ".resblocks.22." not in k}
    path = quirks.save(tmp_path / "short.safetensors", short, metadata=None)
    rc, _, err = cli(capsys, "inspect", path)
    one_line_error(rc, err, "short.safetensors", "22 layers", "24", "cannot be made up")


def test_diffusers_folder_is_refused_naming_the_conversion(tmp_path, capsys):
    folder = tmp_path / "pipeline"
    for sub in ("unet", "text_encoder", "vae"):
        (folder / sub).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    a = quirks.save(tmp_path / "a.safetensors", quirks.small_pair()[0])
    rc, _, err = cli(capsys, "merge", a, folder, "-o", tmp_path / "out.safetensors")
    one_line_error(rc, err, "pipeline", "diffusers pipeline folder", "convert_diffusers_to_original")
    assert not (tmp_path / "out.safetensors").exists()


def test_inspect_names_the_source_layout(tmp_path, capsys):
    sd = tiny("sdxl", 0)
    path = quirks.save(tmp_path / "forge.safetensors", quirks.to_forge(sd), metadata=None)
    main(["inspect", "--json", str(path)])
    info = json.loads(capsys.readouterr().out)
    layout = info["layout"]
    assert layout["source"] == f"{key_layouts.FORGE}, {key_layouts.HF_OPENCLIP}"  # CLIP-G in HF layout
    assert layout["renamed"] == sum(
        1 for k in quirks.to_forge(sd) if k.startswith(("text_encoders.", "vae."))
    )
    src, dst = layout["example"].split(" -> ")
    assert src.startswith("text_encoders.") and dst.startswith("conditioner.embedders.")
    main(["inspect", str(path)])
    out = capsys.readouterr().out
    assert "layout:" in out and key_layouts.FORGE in out


def test_two_names_for_one_canonical_key_are_refused(tmp_path):
    a = quirks.small_pair()[0]
    key = next(k for k in a if k.startswith(UNET))
    a["_orig_mod." + key] = a[key]
    path = quirks.save(tmp_path / "dup.safetensors", a)
    with pytest.raises(UserError, match="two keys for"):
        open_checkpoint(path)


# --------------------------------------------------------------------------------------------
# Part 4: kinds


def test_the_table_is_consistent():
    assert all(kind.policy in key_kinds.POLICIES for kind in key_kinds.KINDS)
    assert all((kind.pattern is None) != (kind.component is None) for kind in key_kinds.KINDS)
    expect = {
        "denoiser.sigmas": key_kinds.KEPT_FROM_EITHER,
        "edm_mean": key_kinds.KEPT_FROM_BASE,
        "edm_vpred.sigma_max": key_kinds.KEPT_FROM_BASE,
        "v_pred": key_kinds.KEPT_FROM_BASE,
        UNET + "time_embedding.cond_proj.weight": key_kinds.KEPT_FROM_EITHER,
        "conditioner.embedders.0.transformer.text_projection.weight": key_kinds.DROPPED,
        "cond_stage_model.transformer.text_model.logit_scale": key_kinds.DROPPED,
        SD1_CLIP + "embeddings.position_ids": key_kinds.EXACT,
        UNET + "input_blocks.0.0.weight": None,
        H + "logit_scale": None,  # part of OpenCLIP: a weight of the config
    }
    for key, policy in expect.items():
        assert key_kinds.policy_of(key) == policy, key
    assert key_kinds.prediction_of(["a", "b"]) == "eps"
    assert key_kinds.prediction_of(["v_pred", "ztsnr"]) == "v-prediction + zero terminal SNR"
    assert key_kinds.prediction_of(["edm_vpred.sigma_min", "edm_vpred.sigma_max", "v_pred"]) == (
        "EDM v-prediction (CosXL)"
    )
    assert key_kinds.prediction_of(["edm_mean", "edm_std"]) == "EDM (Playground v2.5)"


def test_keys_other_tools_add_follow_the_table(tmp_path, capsys):
    """A: Playground-style EDM markers, sgm sigmas and ComfyUI's extra CLIP-L projection; B: an LCM
    guidance projection and v-prediction. The output: merged weights, A's markers and sigmas, B's
    cond_proj (only B has it), no extra projection; one warning naming both prediction types."""
    a, b = quirks.small_pair()
    sigmas = torch.linspace(0.03, 14.6, 1000)
    a.update(
        {
            "edm_mean": torch.tensor([0.5, 0.3, 0.2, 0.1]),
            "edm_std": torch.tensor([1.1, 1.2, 1.3, 1.4]),
            "denoiser.sigmas": sigmas,
            "cond_stage_model.transformer.text_projection.weight": torch.eye(64),
            "cond_stage_model.logit_scale": torch.tensor(4.6),
        }
    )
    cond_proj = torch.randn(32, 16)
    b.update(
        {UNET + "time_embedding.cond_proj.weight": cond_proj, "v_pred": torch.zeros(0, dtype=torch.int64)}
    )
    pa = quirks.save(tmp_path / "A.safetensors", a)
    pb = quirks.save(tmp_path / "B.safetensors", b)
    out = tmp_path / "out.safetensors"
    rc, _, err = cli(capsys, "merge", pa, pb, "-o", out, "--output-dtype", "fp32", "--iters", "2")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "PREDICTION TYPES DIFFER" in line]
    assert len(warnings) == 1, err
    assert (
        "A.safetensors is EDM (Playground v2.5)" in warnings[0]
        and "B.safetensors is v-prediction" in warnings[0]
    )
    merged = load_file(str(out))
    assert torch.equal(merged["edm_mean"], a["edm_mean"]) and torch.equal(merged["edm_std"], a["edm_std"])
    assert torch.equal(merged["denoiser.sigmas"], sigmas)
    assert torch.equal(merged[UNET + "time_embedding.cond_proj.weight"], cond_proj)
    assert "v_pred" not in merged  # a marker is the base model's only
    assert not any("text_projection" in k or "logit_scale" in k for k in merged)
    key = SD1_CLIP + "final_layer_norm.weight"
    assert not torch.equal(merged[key], a[key])  # merged weights are merged


def test_either_side_keeps_sgm_sigmas_when_only_b_has_them(tmp_path):
    a, b = quirks.small_pair()
    sigmas = torch.linspace(0.03, 14.6, 1000)
    b["denoiser.sigmas"] = sigmas
    pa, pb = quirks.save(tmp_path / "A.safetensors", a), quirks.save(tmp_path / "B.safetensors", b)
    result = run("average", pa, pb, tmp_path / "o.safetensors", RunOptions(quiet=True, threads=1))
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["denoiser.sigmas"], sigmas)
    assert result.left_out == 0


def test_long_clip_against_a_77_position_encoder_is_refused(tmp_path, capsys):
    a, b = quirks.small_pair()
    key = SD1_CLIP + "embeddings.position_embedding.weight"
    long = dict(b)
    long[key] = torch.randn(key_kinds.LONG_CLIP_POSITIONS, a[key].shape[1])
    long[SD1_CLIP + "embeddings.position_ids"] = torch.arange(248).reshape(1, 248)
    pa, pl = quirks.save(tmp_path / "A.safetensors", a), quirks.save(tmp_path / "long.safetensors", long)
    out = tmp_path / "out.safetensors"
    rc, _, err = cli(capsys, "merge", pa, pl, "-o", out)
    one_line_error(rc, err, "long.safetensors", key, "[248, 64]", "[77, 64]", "LongCLIP")
    assert not out.exists()
    rc, _, err = cli(capsys, "merge", pl, pa, "-o", out)
    one_line_error(rc, err, "A.safetensors", key, "[248, 64]", "[77, 64]", "LongCLIP")


def test_two_long_clip_models_merge_with_248_positions(tmp_path):
    key = SD1_CLIP + "embeddings.position_embedding.weight"
    ids = SD1_CLIP + "embeddings.position_ids"
    models = []
    for seed, sd in enumerate(quirks.small_pair()):
        sd = dict(sd)
        gen = torch.Generator().manual_seed(seed)
        sd[key] = torch.randn(key_kinds.LONG_CLIP_POSITIONS, sd[key].shape[1], generator=gen)
        sd[ids] = torch.arange(77).reshape(1, 77)  # a broken buffer: the exact one has 248 entries
        models.append(sd)
    pa = quirks.save(tmp_path / "A.safetensors", models[0])
    pb = quirks.save(tmp_path / "B.safetensors", models[1])
    opts = RunOptions(threads=1, quiet=True, output_dtype="fp32", iters=2)
    run("average", pa, pb, tmp_path / "avg.safetensors", opts)
    avg = load_file(str(tmp_path / "avg.safetensors"))
    assert torch.equal(avg[key], torch.lerp(models[0][key], models[1][key], 0.5))
    assert torch.equal(avg[ids], torch.arange(248).reshape(1, 248))
    result = run("merge", pa, pb, tmp_path / "m.safetensors", opts)
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert merged[key].shape == (248, models[0][key].shape[1])
    stream = next(name for name in result.perms if name.startswith(SD1_CLIP))
    aligned = models[1][key][:, torch.as_tensor(result.perms[stream])]
    assert torch.allclose(merged[key], torch.lerp(models[0][key], aligned, 0.5), atol=1e-6)


def test_sdxl_unet_and_vae_without_text_encoders_merge(tmp_path, capsys):
    """SDXL files of UNet + VAE: the UNet's permutations are matched without the text encoders
    (cross-attention k/v and label_emb's pooled columns stay as they are); a hidden permutation of
    B is recovered, so the merge is the mean of A and the un-permuted B."""
    from sd_mecha_rebasin.architectures import permutation_spec
    from sd_mecha_rebasin.permutations.groups import random_element
    from sd_mecha_rebasin.permutations.spec import permute_tensor

    shapes = {
        k: s for k, s in {**key_shapes("sdxl", "tiny"), **VAE}.items() if not k.startswith("conditioner.")
    }
    arch = arch_overrides("sdxl", "tiny")
    spec = permutation_spec("sdxl-sgm", arch=arch, shapes=shapes)
    assert not any(k.startswith("conditioner.") for k in spec.axes)
    for key in ("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", "label_emb.0.0.weight"):
        assert 1 not in spec.axes.get(UNET + key, {}), key  # their input columns are never permuted
    a = {k: v for k, v in tiny("sdxl", 0).items() if k in shapes}
    rng = np.random.default_rng(5)
    perms = {name: random_element(sp.tree, rng) for name, sp in spec.spaces.items()}
    b = {k: permute_tensor(spec, k, v, perms) if k in spec.axes else v for k, v in a.items()}
    pa = quirks.save(tmp_path / "A.safetensors", a, metadata=None)
    pb = quirks.save(tmp_path / "B.safetensors", b, metadata=None)
    opts = dataclasses.replace(tiny_options("sdxl"), quiet=False, progress=False, shapes=shapes)
    result = run("merge", pa, pb, tmp_path / "m.safetensors", opts)
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "no text encoder" in line]
    assert len(notes) == 1 and "UNet + VAE only" in notes[0] and "UNets and VAEs are merged" in notes[0], err
    assert result.rel_distance < 1e-6
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert sorted(merged) == sorted(a)
    for key, value in a.items():
        assert torch.allclose(merged[key], value, atol=1e-6), key


def test_sd_mecha_recipes_read_forge_files_as_canonical(tmp_path):
    """`import sd_mecha_rebasin` is enough: a recipe over Forge files merges canonical keys."""
    import sd_mecha

    import sd_mecha_rebasin  # noqa: F401

    a, b = tiny("sdxl", 0), tiny("sdxl", 1)
    fa = quirks.save(tmp_path / "fA.safetensors", quirks.to_forge(a), metadata=None)
    fb = quirks.save(tmp_path / "fB.safetensors", quirks.to_forge(b), metadata=None)
    recipe = sd_mecha.weighted_sum(
        sd_mecha.model(str(fa), "sdxl-sgm"), sd_mecha.model(str(fb), "sdxl-sgm"), alpha=0.5
    )
    out: dict[str, torch.Tensor] = {}
    tiny_merge.merge(recipe, output=out, output_dtype=torch.float32, threads=1, check_extra_keys=False)
    out.pop("__metadata__", None)
    for key in (
        G + "transformer.resblocks.3.attn.in_proj_weight",
        G + "text_projection",
        UNET + "out.2.weight",
    ):
        assert torch.allclose(out[key], torch.lerp(a[key], b[key], 0.5), atol=1e-6), key


# --------------------------------------------------------------------------------------------
# sd-mecha's model formats (files/sd_mecha_formats.py)

IMPORT_ALONE = """
import sys

import sd_mecha
import torch

import sd_mecha_rebasin

a, b, out = sys.argv[1:4]
recipe = sd_mecha.weighted_sum(sd_mecha.model(a, "sd1-ldm"), sd_mecha.model(b, "sd1-ldm"), alpha=0.5)
merged = {}
sd_mecha.merge(recipe, output=merged, output_dtype=torch.float32, threads=1, check_extra_keys=False)
merged.pop("__metadata__", None)
torch.save(merged, out)
"""


def test_importing_the_package_lets_sd_mecha_read_pickles(tmp_path):
    """As inside ComfyUI: a fresh process that only imports the package merges two .ckpt files
    through sd-mecha (one of them saved under DDP's `module.` prefix: read as canonical too)."""
    import os
    import subprocess
    import sys

    a, b = tiny("sd1", 0), tiny("sd1", 1)
    fa = quirks.save_ckpt(tmp_path / "a.ckpt", a, "state_dict")
    fb = quirks.save_ckpt(tmp_path / "b.pt", b, "module_prefix")
    out = tmp_path / "merged.pt"
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALONE, str(fa), str(fb), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    merged = torch.load(out, weights_only=True)
    assert sorted(merged) == sorted(a)
    for key, value in a.items():
        assert torch.allclose(merged[key], torch.lerp(value, b[key], 0.5), atol=1e-6), key


def test_register_twice_wraps_every_format_once(tmp_path, monkeypatch):
    """`register()` is idempotent: one format per file kind, every reader wrapped once (a Forge file
    still reads as canonical), and a format registered since the last call is wrapped too."""
    from sd_mecha.extensions import model_formats

    sd_mecha_formats.register()
    readers = {id(f): f.get_read_dict for f in model_formats.get_all()}
    sd_mecha_formats.register()
    assert {id(f): f.get_read_dict for f in model_formats.get_all()} == readers
    for name in ("x.ckpt", "x.pt", "x.pth", "x.gguf", "x.safetensors"):
        assert len([f for f in model_formats.get_all() if f.matches(pathlib.Path(name))]) == 1, name

    sd = tiny("sdxl", 0)
    forge = quirks.to_forge(sd)
    assert_equal_dicts(sd_mecha_read(quirks.save(tmp_path / "forge.safetensors", forge, metadata=None)), sd)
    assert_equal_dicts(sd_mecha_read(quirks.save_ckpt(tmp_path / "forge.ckpt", forge, "state_dict")), sd)

    monkeypatch.setattr(model_formats, "_model_format_registry", dict(model_formats._model_format_registry))

    class OtherPackagesFormat:  # e.g. a plugin's: reads .other files (here: pickles)
        def matches(self, path: pathlib.Path) -> bool:
            return path.suffix == ".other"

        def get_read_dict(self, path: pathlib.Path, buffer_size: int):
            return sd_mecha_formats.ReadDict(sd_mecha_formats.pickle_source(path))

        def get_write_dict(self, path, model_config, mecha_recipe, buffer_size):
            raise NotImplementedError

    model_formats.register_model_format(OtherPackagesFormat, identifier="test_other_format")
    other = quirks.save_ckpt(tmp_path / "forge.other", forge, "plain")
    assert sorted(sd_mecha_read(other)) == sorted(forge)  # not wrapped yet: the file's own keys
    sd_mecha_formats.register()
    assert_equal_dicts(sd_mecha_read(other), sd)
