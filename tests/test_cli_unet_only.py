"""UNet-only files through the commands: pairs in each key layout, a full model with a UNet-only one
(either order), alignment, inspect, merge-many, and GGUF inputs; values asserted.

B's UNet is a hidden legal UNet-only permutation of A's (no noise), so a correct re-basin merge of
the UNets gives A's UNet back (up to the output dtype) while a plain average would not.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from support.unet_only import CLIP, in_layout, permuted_unet, small_models, unet_of

from sd_mecha_rebasin.architectures.small import DEMO_LAYOUT, DEMO_LAYOUT_KEY
from sd_mecha_rebasin.cli.commands import main
from sd_mecha_rebasin.files.output import write_safetensors

LAYOUTS = {"prefixed": "sd1-ldm", "bare": "sd1-ldm_unet_only", "diffusers": "sd1-diffusers_unet_only"}
MARK = {DEMO_LAYOUT_KEY: DEMO_LAYOUT}
_in_layout, _unet = in_layout, unet_of


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _close(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
    assert x.keys() == y.keys()
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


@pytest.fixture(scope="module")
def models():
    return small_models()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unet_only_pair_merges_in_its_own_layout(tmp_path, capsys, models, layout):
    full, b_unet, _ = models
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    write_safetensors(a, _in_layout(_unet(full), layout), MARK)
    write_safetensors(b, _in_layout(b_unet, layout), MARK)
    rc, stdout, err = cli(capsys, "merge", a, b, "-o", out, "--output-dtype", "fp32", "--json", "--quiet")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["config"] == LAYOUTS[layout] and summary["units_moved"] > 0
    assert summary["merged_parts"].startswith("merged the UNets only: both models are UNet-only")
    merged = load_file(out)
    expected = _in_layout(_unet(full), layout)
    assert _close(merged, expected) < 1e-6  # pi(B) == A exactly: the merge is A
    plain = {k: (expected[k] + v) / 2 for k, v in _in_layout(b_unet, layout).items()}
    assert _close(plain, expected) > 0.1  # what a merge without re-basin would have given


@pytest.mark.parametrize("order", ["full_first", "unet_first"])
def test_full_model_with_unet_only_model(tmp_path, capsys, models, order):
    full, b_unet, _ = models
    f, u, out = tmp_path / "full.safetensors", tmp_path / "unet.safetensors", tmp_path / "m.safetensors"
    write_safetensors(f, full, MARK)
    write_safetensors(u, _in_layout(b_unet, "bare"), MARK)
    a, b = (f, u) if order == "full_first" else (u, f)
    rc, stdout, err = cli(capsys, "merge", a, b, "-o", out, "--output-dtype", "fp32")
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "merged the UNets only" in line]
    assert len(notes) == 1 and "unet.safetensors is UNet-only" in notes[0], err
    assert "text encoders and VAE of full.safetensors pass through" in notes[0]
    merged = load_file(out)
    assert set(merged) == set(full)  # the full model's layout, whichever side it was on
    # The UNets merge in A's basis (B re-based onto A): the full UNet, or its permutation b_unet.
    assert _close(_unet(merged), _unet(full) if order == "full_first" else b_unet) < 1e-6
    for key in full:
        if key.startswith(CLIP):
            assert torch.equal(merged[key].to(full[key].dtype), full[key]), key  # passed through, unpermuted


def test_align_unet_only_to_full_reference(tmp_path, capsys, models):
    full, b_unet, _ = models
    f, u, out = tmp_path / "full.safetensors", tmp_path / "unet.safetensors", tmp_path / "aligned.safetensors"
    write_safetensors(f, full, MARK)
    write_safetensors(u, _in_layout(b_unet, "diffusers"), MARK)
    rc, _, err = cli(capsys, "align", u, "--ref", f, "-o", out, "--output-dtype", "fp32")
    assert rc == 0, err
    aligned = load_file(out)
    assert _close(aligned, _in_layout(_unet(full), "diffusers")) < 1e-6  # B's layout, A's basis


def test_inspect_names_the_unet_only_layout(tmp_path, capsys, models):
    full, _, _ = models
    path = tmp_path / "unet.safetensors"
    write_safetensors(path, _in_layout(_unet(full), "diffusers"), MARK)
    rc, stdout, err = cli(capsys, "inspect", path, "--json")
    assert rc == 0, err
    info = json.loads(stdout)
    assert info["family"] == "SD1" and info["config"] == "sd1-diffusers_unet_only" and info["unet_only"]
    assert info["problem"] is None and info["permuted_keys"] == len(_unet(full)) - 1  # all but conv_out.bias


@pytest.mark.parametrize("layout", ["bare", "prefixed"])
def test_merge_many_unet_only(tmp_path, capsys, models, layout):
    full, b_unet, _ = models
    paths = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    write_safetensors(paths[0], _in_layout(_unet(full), layout), MARK)
    write_safetensors(paths[1], _in_layout(b_unet, layout), MARK)
    c_unet, _ = permuted_unet(full, seed=5)
    write_safetensors(paths[2], _in_layout(c_unet, layout), MARK)
    out = tmp_path / "many.safetensors"
    rc, _, err = cli(capsys, "merge-many", *paths, "-o", out, "--output-dtype", "fp32", "--quiet")
    assert rc == 0, err
    assert _close(load_file(out), _in_layout(_unet(full), layout)) < 1e-5


def test_inspect_of_a_prefixed_unet_only_file_leaves_the_text_encoder_out(tmp_path, capsys, models):
    full, _, _ = models
    path = tmp_path / "unet.safetensors"
    write_safetensors(path, _unet(full), MARK)
    rc, stdout, err = cli(capsys, "inspect", path, "--json")
    assert rc == 0, err
    info = json.loads(stdout)
    assert info["config"] == "sd1-ldm" and info["unet_only"] and "text_stream" not in info["spec_summary"]
    assert info["input_channels"] == 4


def test_merge_many_refuses_a_mix_of_unet_only_and_full_models(tmp_path, capsys, models):
    full, b_unet, _ = models
    paths = [tmp_path / "full.safetensors", tmp_path / "u1.safetensors", tmp_path / "u2.safetensors"]
    write_safetensors(paths[0], full, MARK)
    write_safetensors(paths[1], b_unet, MARK)  # prefixed: same config, no text encoder
    write_safetensors(paths[2], _in_layout(b_unet, "bare"), MARK)
    out = tmp_path / "many.safetensors"
    rc, _, err = cli(capsys, "merge-many", paths[0], paths[1], "-o", out)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and "u1.safetensors" in lines[0] and "is UNet-only" in lines[0], err
    rc, _, err = cli(capsys, "merge-many", paths[1], paths[2], "-o", out)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and "key layout" in lines[0], err
    assert not out.exists()


def test_inpainting_unet_only_with_a_plain_one(tmp_path, capsys, models):
    """An inpainting UNet-only A (9 input channels, bare names) with a plain B: channels 0:4 merged
    (re-based B), A's extra channels kept exactly."""
    full, b_unet, _ = models
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    a_unet = _unet(full)
    extra = torch.randn(a_unet[conv].shape[0], 5, 3, 3, generator=torch.Generator().manual_seed(3))
    a_unet[conv] = torch.cat([a_unet[conv], extra], dim=1)
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    write_safetensors(a, _in_layout(a_unet, "bare"), MARK)
    write_safetensors(b, _in_layout(b_unet, "bare"), MARK)
    rc, _, err = cli(capsys, "merge", a, b, "-o", out, "--output-dtype", "fp32", "--quiet")
    assert rc == 0, err
    assert _close(load_file(out), _in_layout(a_unet, "bare")) < 1e-6
