"""The `sd-rebasin` command line: every bad input fails with one line, good inputs merge end to end.

Bad-input tests use small files: "fragments" (a few tensors of real SD1 shapes, enough for
detection and validation) and "sparse" full layouts (a real header over a sparse, all-zero data
section, so a full SDXL layout costs no disk). End-to-end tests merge the demo's small SD1 models.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_mecha_rebasin.cli.commands import main
from sd_mecha_rebasin.common.errors import UserError
from sd_mecha_rebasin.files.output import AtomicOutput, write_safetensors

HANG_GUARD_SECONDS = 1800
"""Subprocess timeouts only catch a hang: the commands take seconds even on a loaded machine."""

UNET = "model.diffusion_model."
CLIP = "cond_stage_model.transformer.text_model."

SD1_FRAGMENT = {
    UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
    UNET + "input_blocks.0.0.bias": (320,),
    UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight": (320, 768),
    CLIP + "final_layer_norm.weight": (768,),
    CLIP + "final_layer_norm.bias": (768,),
}


def fragment(path: pathlib.Path, seed: int = 0, **changes) -> pathlib.Path:
    """A few tensors with real SD1 names and shapes; `changes` maps a key's last parts to a new tensor."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g).half() for k, s in SD1_FRAGMENT.items()}
    for suffix, value in changes.items():
        key = next(k for k in sd if k.endswith(suffix.replace("__", ".")))
        sd[key] = value
    save_file(sd, str(path))
    return path


def config_shapes(config: str, components: tuple[str, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
    from sd_mecha.extensions import model_configs

    import sd_mecha_rebasin  # noqa: F401  (registers sd2-ldm)

    names = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
    out = {}
    for name, component in model_configs.resolve(config).components().items():
        if name in components:
            for key, meta in component.keys().items():
                out[key] = (
                    tuple(meta.shape),
                    names.get(meta.dtype, "F16") if not meta.dtype.is_floating_point else "F16",
                )
    return out


def sparse(
    path: pathlib.Path, layout: dict[str, tuple[tuple[int, ...], str]], **shape_changes
) -> pathlib.Path:
    """A safetensors file with a full layout's header and a sparse all-zero data section."""
    sizes = {"F16": 2, "F32": 4, "I64": 8}
    header, offset = {}, 0
    for key, (shape, dtype) in layout.items():
        for suffix, new in shape_changes.items():
            if key.endswith(suffix.replace("__", ".")):
                shape = new
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, expected_rc: int, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == expected_rc, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("sd-rebasin: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def only_inputs_left(directory: pathlib.Path, *inputs: pathlib.Path) -> None:
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in inputs)


@pytest.fixture
def pair(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return fragment(tmp_path / "A.safetensors", 0), fragment(tmp_path / "B.safetensors", 1)


# --------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, no output file


def test_missing_file(pair, tmp_path, capsys):
    a, _ = pair
    rc, _, err = run_cli(capsys, "merge", a, "nope.safetensors")
    assert_one_line_error(rc, err, 1, "nope.safetensors: no such file")
    only_inputs_left(tmp_path, *pair)


def test_not_a_safetensors_file(pair, tmp_path, capsys):
    a, _ = pair
    bad = tmp_path / "notes.safetensors"
    bad.write_text("these are not weights\n" * 10)
    rc, _, err = run_cli(capsys, "merge", a, bad)
    assert_one_line_error(rc, err, 1, "notes.safetensors: not a safetensors file")
    only_inputs_left(tmp_path, *pair, bad)


def test_truncated_safetensors(pair, tmp_path, capsys):
    a, b = pair
    data = b.read_bytes()
    b.write_bytes(data[: len(data) - 1000])
    rc, _, err = run_cli(capsys, "merge", a, b)
    assert_one_line_error(rc, err, 1, "B.safetensors: truncated safetensors file")
    only_inputs_left(tmp_path, *pair)


def test_lora_is_refused_by_name(pair, tmp_path, capsys):
    a, _ = pair
    lora = tmp_path / "style_lora.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        str(lora),
    )
    rc, _, err = run_cli(capsys, "merge", a, lora)
    assert_one_line_error(rc, err, 1, "style_lora.safetensors: not a Stable Diffusion checkpoint", "LoRA")
    rc, _, err = run_cli(capsys, "inspect", lora)
    assert_one_line_error(rc, err, 1, "LoRA")


def test_sd1_with_sdxl(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    a = sparse(tmp_path / "sd15.safetensors", config_shapes("sd1-ldm", ("clip_l", "diffuser")))
    b = sparse(tmp_path / "xl.safetensors", config_shapes("sdxl-sgm", ("clip_l", "clip_g", "diffuser")))
    rc, _, err = run_cli(capsys, "merge", a, b)
    assert_one_line_error(rc, err, 1, "xl.safetensors: is SDXL", "sd15.safetensors is SD1", "same family")
    only_inputs_left(tmp_path, a, b)


@pytest.mark.parametrize("command", ["merge", "align", "merge-many"])
def test_a_text_encoder_missing_a_key_is_refused_before_the_merge(tmp_path, monkeypatch, capsys, command):
    """The permutation rules need every key of a text encoder the file has (a UNet-only file, with
    none, merges: tests/test_cli_unet_only.py): one missing is named instead of failing mid-merge."""
    monkeypatch.chdir(tmp_path)
    layout = config_shapes("sd1-ldm", ("clip_l", "diffuser"))
    del layout[CLIP + "embeddings.token_embedding.weight"]
    a = sparse(tmp_path / "a.safetensors", layout)
    b = sparse(tmp_path / "b.safetensors", config_shapes("sd1-ldm", ("clip_l", "diffuser")))
    args = {
        "merge": [a, b],
        "align": [b, "--ref", a, "-o", "o.safetensors"],
        "merge-many": [b, a, "-o", "o.safetensors"],
    }
    rc, _, err = run_cli(capsys, command, *args[command])
    assert_one_line_error(
        rc,
        err,
        1,
        "a.safetensors: cannot be re-based: it lacks cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "(text encoder)",
    )
    only_inputs_left(tmp_path, a, b)


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weight_names_the_key(tmp_path, monkeypatch, capsys, value, word):
    """On models the rules accept (a fragment is refused first, from its header: test above)."""
    from support import quirks

    monkeypatch.chdir(tmp_path)
    sd_a, sd_b = quirks.small_pair()
    key = next(k for k in sd_b if k.endswith("attn2.to_v.weight"))
    bad = sd_b[key].clone()
    bad[5, 7] = value
    a = quirks.save(tmp_path / "A.safetensors", sd_a)
    b = quirks.save(tmp_path / "B.safetensors", {**sd_b, key: bad})
    rc, _, err = run_cli(capsys, "merge", a, b)
    assert_one_line_error(rc, err, 1, "B.safetensors", key, word)
    only_inputs_left(tmp_path, a, b)


def test_output_exists_without_overwrite(pair, tmp_path, capsys):
    a, b = pair
    existing = tmp_path / "merged.safetensors"
    existing.write_bytes(b"keep me")
    rc, _, err = run_cli(capsys, "merge", a, b)
    assert_one_line_error(rc, err, 1, "merged.safetensors: already exists", "--overwrite")
    assert existing.read_bytes() == b"keep me"


def test_output_directory_not_writable(pair, tmp_path, monkeypatch, capsys):
    a, b = pair
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: simulate the refusal
        import sd_mecha_rebasin.files.output as output

        real_open = os.open

        def refuse(path, *args, **kwargs):
            if pathlib.Path(path).parent == locked:
                raise PermissionError(13, "Permission denied")
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(output.os, "open", refuse)
    else:
        locked.chmod(0o555)
    try:
        rc, _, err = run_cli(capsys, "merge", a, b, "-o", locked / "out.safetensors")
    finally:
        locked.chmod(0o755)
    assert_one_line_error(rc, err, 1, "locked: output directory is not writable")
    assert list(locked.iterdir()) == []


def test_output_directory_missing(pair, tmp_path, capsys):
    a, b = pair
    rc, _, err = run_cli(capsys, "merge", a, b, "-o", tmp_path / "nowhere" / "out.safetensors")
    assert_one_line_error(rc, err, 1, "nowhere: output directory does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(pair, tmp_path, capsys):
    a, b = pair
    rc, _, err = run_cli(capsys, "merge", a, b, "--device", "cuda")
    assert_one_line_error(rc, err, 1, "--device cuda: no GPU available")
    only_inputs_left(tmp_path, *pair)


@pytest.mark.parametrize("alpha", ["1.5", "-0.1", "nan"])
def test_alpha_outside_unit_interval(pair, tmp_path, capsys, alpha):
    a, b = pair
    rc, _, err = run_cli(capsys, "merge", a, b, "--alpha", alpha)
    assert_one_line_error(rc, err, 2, f"--alpha {float(alpha)}", "--allow-extrapolation")
    only_inputs_left(tmp_path, *pair)


def test_usage_error_is_one_line(pair, capsys):
    a, b = pair
    rc, _, err = run_cli(capsys, "merge", a, b, "--frobnicate")
    assert_one_line_error(rc, err, 2, "--frobnicate")
    rc, _, err = run_cli(capsys, "align", b)
    assert_one_line_error(rc, err, 2, "--ref")


def test_pickle_needing_more_than_tensors_is_refused(pair, tmp_path, capsys):
    a, _ = pair
    evil = tmp_path / "old.ckpt"
    torch.save({"state_dict": load_file(str(a)), "args": argparse.Namespace(lr=1e-4)}, evil)
    rc, _, err = run_cli(capsys, "merge", a, evil)
    assert_one_line_error(rc, err, 1, "old.ckpt: refused", "weights_only")


def test_corrupt_pickle(pair, tmp_path, capsys):
    a, _ = pair
    torch.save({"state_dict": load_file(str(a))}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    rc, _, err = run_cli(capsys, "merge", a, tmp_path / "cut.ckpt")
    assert_one_line_error(rc, err, 1, "cut.ckpt: not a readable PyTorch checkpoint")


def test_output_must_not_be_an_input(pair, capsys):
    a, b = pair
    rc, _, err = run_cli(capsys, "merge", a, b, "-o", a, "--overwrite")
    assert_one_line_error(rc, err, 1, "A.safetensors: is an input")


# --------------------------------------------------------------------------------------------
# Reading and writing


def test_inspect_fragment_and_ckpt_wrapper(pair, tmp_path, capsys):
    a, _ = pair
    torch.save({"state_dict": load_file(str(a)), "global_step": 10}, tmp_path / "A.ckpt")
    for path, fmt in ((a, "safetensors"), (tmp_path / "A.ckpt", "pickle")):
        rc, out, err = run_cli(capsys, "inspect", path, "--json")
        info = json.loads(out)
        assert rc == 0, err
        assert (info["family"], info["config"], info["format"]) == ("SD1", "sd1-ldm", fmt)
        assert info["keys"] == len(SD1_FRAGMENT)
        assert info["dtypes"] == {"fp16": len(SD1_FRAGMENT)}
        assert info["permuted_keys"] == len(SD1_FRAGMENT)


def test_write_safetensors_round_trip(tmp_path):
    tensors = {
        "w": torch.randn(3, 4),
        "h": torch.randn(5).half(),
        "b": torch.randn(2, 2).bfloat16(),
        "ids": torch.arange(77).unsqueeze(0),
        "v_pred": torch.zeros(0, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, {"k": "v"})
    back = load_file(str(path))
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_len % 8 == 0


def test_atomic_output_leaves_nothing_on_interrupt(tmp_path, monkeypatch):
    import sd_mecha_rebasin.files.output as output

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(output, "write_safetensors", interrupted)
    target = tmp_path / "out.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with AtomicOutput(target) as out:
            out.commit({"w": torch.zeros(2)}, None)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="already exists"):
        target.write_bytes(b"x")
        AtomicOutput(target)


def test_python_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "sd_mecha_rebasin", "--help"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_SECONDS,  # a hang, not a slow machine
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("merge", "align", "inspect", "demo"):
        assert command in proc.stdout


# --------------------------------------------------------------------------------------------
# End to end on the demo's small SD1 models (the real merge method through sd-mecha)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`sd-rebasin demo --out-dir`: its report and its A/B files (reused by the tests below)."""
    out = tmp_path_factory.mktemp("demo")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["demo", "--out-dir", str(out), "--json", "--threads", "2"])
    assert rc == 0
    return json.loads(buf.getvalue()), out


@pytest.fixture
def models(demo_run, tmp_path, monkeypatch):
    """Copies of the demo's A and B in a fresh directory (the current one)."""
    import shutil

    _, out = demo_run
    monkeypatch.chdir(tmp_path)
    return shutil.copy(out / "A.safetensors", tmp_path), shutil.copy(out / "B.safetensors", tmp_path)


def test_demo_recovers_the_hidden_permutation(demo_run):
    report, out = demo_run
    assert report["recovered"] and report["permutations_recovered"] == report["permutations"] > 100
    assert report["rebasin_distance_to_a"] < 0.05 < 0.5 < report["plain_average_distance_to_a"]
    assert abs(report["rebasin_norm_ratio"] - 1) < 0.01 and report["plain_average_norm_ratio"] < 0.9
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["A.safetensors", "B.safetensors", "plain_average.safetensors", "rebasin_merge.safetensors"]
    )


def test_merge_end_to_end(models, tmp_path, monkeypatch, capsys):
    import sd_mecha
    from safetensors import safe_open

    import sd_mecha_rebasin  # noqa: F401  (git_rebasin must be registered to load the recipe)

    a, b = map(pathlib.Path, models)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # progress bars are for terminals
    rc, out, err = run_cli(capsys, "merge", a, b, "--json", "--threads", "2", "--save-recipe", "r.mecha")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["output"] == "merged.safetensors" and summary["family"] == "SD1"
    assert summary["converged"] and summary["rel_distance"] < 0.05 and summary["alpha"] == 0.5
    assert (
        summary["permutations_changed"] > 100 and summary["sweeps"] >= 1
    )  # the warm start often leaves one confirming sweep
    assert summary["kept_keys"] == {"buffers": 1, "scheduler": 12} and summary["left_out_keys"] == 0
    assert "re-basin sweep" in err and "keys" in err  # the two progress bars
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "A.safetensors",
        "B.safetensors",
        "merged.safetensors",
        "r.mecha",
    ]

    merged, sd_a, sd_b = (load_file(str(p)) for p in (tmp_path / "merged.safetensors", a, b))
    assert list(merged) == list(sd_a)  # A's key layout, A's order
    unet = UNET + "input_blocks.1.0.in_layers.2.weight"
    assert merged[unet].dtype == torch.float16
    assert (merged[unet].float() - sd_a[unet]).norm() < 0.05 * sd_a[unet].norm()  # averaged with an aligned B
    assert (0.5 * (sd_a[unet] + sd_b[unet]) - sd_a[unet]).norm() > 0.3 * sd_a[unet].norm()
    for key in ("alphas_cumprod", CLIP + "embeddings.position_ids"):  # kept as they are, dtype too
        assert merged[key].dtype == sd_a[key].dtype and torch.equal(merged[key], sd_a[key])

    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "merged"
    assert meta["modelspec.merged_from"] == "A.safetensors, B.safetensors"
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["alpha"] == 0.5 and recipe["converged"] is True
    models_meta = json.loads(meta["sd_merge_models"])
    import hashlib

    sha_a = hashlib.sha256(a.read_bytes()).hexdigest()
    assert recipe["primary_model_hash"] == sha_a and models_meta[sha_a]["name"] == "A.safetensors"
    assert 'model "A.safetensors"' in meta["mecha_recipe"] and "git_rebasin" in meta["mecha_recipe"]
    assert all(str(tmp_path) not in value for value in meta.values())  # no full paths

    node = sd_mecha.deserialize((tmp_path / "r.mecha").read_text())
    assert "git_rebasin" in (tmp_path / "r.mecha").read_text() and node is not None


def test_keys_outside_the_merge_are_kept_from_a(models, tmp_path, capsys):
    a, b = map(pathlib.Path, models)
    sd_a, sd_b = load_file(str(a)), load_file(str(b))
    unet = UNET + "input_blocks.1.0.in_layers.2.weight"
    extras = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1234, dtype=torch.int32),
        "model_ema.diffusion_modelinput_blocks10in_layers2weight": sd_a[unet].clone(),
        "v_pred": torch.zeros(0, dtype=torch.int64),
        "my_tool.extra_weight": torch.randn(3, 3, dtype=torch.float64),
    }
    # new files: load_file maps the originals, which must not be rewritten while in use
    a, b = tmp_path / "A2.safetensors", tmp_path / "B2.safetensors"
    write_safetensors(a, {**sd_a, **extras}, {"sd_rebasin_layout": "demo-small-sd1"})
    write_safetensors(b, {**sd_b, "only_in_b.weight": torch.ones(2)}, {"sd_rebasin_layout": "demo-small-sd1"})
    rc, out, err = run_cli(capsys, "merge", a, b, "--threads", "2", "--no-metadata")
    assert rc == 0, err
    assert "1 key(s) only in B2.safetensors left out" in err
    assert "kept from A:" in out
    merged = load_file("merged.safetensors")
    assert "only_in_b.weight" not in merged
    for key, value in extras.items():
        assert key in merged, key
        expected = (
            value.half() if key.startswith("model_ema.diffusion") else value
        )  # EMA weights: output dtype
        assert merged[key].dtype == expected.dtype and torch.equal(merged[key], expected), key
    from safetensors import safe_open

    with safe_open("merged.safetensors", "pt") as f:
        assert not f.metadata()


def test_align_permutes_b_and_its_ema(models, tmp_path, capsys):
    a, b = map(pathlib.Path, models)
    sd_a, sd_b = load_file(str(a)), load_file(str(b))
    unet = UNET + "input_blocks.1.0.in_layers.2.weight"
    ema = "model_ema.diffusion_modelinput_blocks10in_layers2weight"
    b = tmp_path / "B2.safetensors"
    write_safetensors(b, {**sd_b, ema: sd_b[unet].clone()}, {"sd_rebasin_layout": "demo-small-sd1"})
    rc, out, err = run_cli(
        capsys, "align", b, "--ref", a, "-o", "aligned.safetensors", "--output-dtype", "fp32", "-q"
    )
    assert rc == 0, err
    assert out == "" and err == ""  # --quiet
    aligned = load_file("aligned.safetensors")
    assert list(aligned) == list(sd_b) + [ema]  # B's key layout
    assert torch.equal(aligned[ema], aligned[unet])  # the EMA copy got the same permutation
    assert (aligned[unet] - sd_a[unet]).norm() < 0.05 * sd_a[unet].norm()
    assert not torch.equal(aligned[unet], sd_b[unet])
    assert sorted(aligned[unet].flatten().tolist()) == sorted(sd_b[unet].flatten().tolist())  # a permutation


def test_ckpt_input_and_extrapolation(models, tmp_path, capsys):
    a, b = map(pathlib.Path, models)
    sd_a, sd_b = load_file(str(a)), load_file(str(b))
    torch.save({"state_dict": sd_b, "global_step": 1}, tmp_path / "B.ckpt")
    rc, _, err = run_cli(
        capsys, "merge", a, "B.ckpt", "--alpha", "-0.25", "--allow-extrapolation", "--iters", "0",
        "--output-dtype", "fp32", "-q", "-o", "x.safetensors",
    )  # fmt: skip
    assert rc == 0, err
    merged = load_file("x.safetensors")
    key = UNET + "out.2.bias"  # the latent channels are never permuted
    assert torch.allclose(merged[key], 1.25 * sd_a[key] - 0.25 * sd_b[key], atol=1e-6)


def test_overwrite_replaces_an_existing_output(models, tmp_path, capsys):
    a, b = map(pathlib.Path, models)
    (tmp_path / "merged.safetensors").write_bytes(b"old")
    rc, _, err = run_cli(capsys, "merge", a, b, "--overwrite", "--iters", "1", "-q")
    assert rc == 0, err
    assert len(load_file("merged.safetensors")) == len(load_file(str(a)))


@pytest.mark.parametrize("exception, code", [(KeyboardInterrupt, 130), (RuntimeError, 1)])
def test_failure_during_the_merge_leaves_no_file(models, tmp_path, monkeypatch, capsys, exception, code):
    import sd_mecha

    a, b = map(pathlib.Path, models)

    def fail(*args, **kwargs):
        raise exception("boom")

    monkeypatch.setattr(sd_mecha, "merge", fail)
    rc, _, err = run_cli(capsys, "merge", a, b, "--save-recipe", "r.mecha")
    assert_one_line_error(rc, err, code, "interrupted" if code == 130 else "internal error")
    only_inputs_left(tmp_path, a, b)


def test_ctrl_c_leaves_no_file(models, tmp_path):
    """SIGINT to the real command line while the merge runs: exit 130 at once, nothing left behind.

    The child stops inside the merge (after creating its partial files) and says so through a
    pipe before the signal is sent, so the merge is still running when it arrives, by construction.
    """
    import signal

    from support.paused import HANG_GUARD_SECONDS, start_paused

    from sd_mecha_rebasin.files.output import partial_path

    a, b = map(pathlib.Path, models)
    folder = tmp_path / "out"
    folder.mkdir()
    args = ["merge", str(a), str(b), "-o", "merged.safetensors", "--threads", "2", "--save-recipe", "r.mecha"]
    proc, _ = start_paused("merging", args, folder, tmp_path / "log")
    try:
        partials = [partial_path(folder / name, proc.pid).name for name in ("merged.safetensors", "r.mecha")]
        assert sorted(p.name for p in folder.iterdir()) == sorted(partials)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=HANG_GUARD_SECONDS)  # a hang guard, not a timing: it exits at once
    finally:
        proc.kill()
        proc.wait()
    err = (tmp_path / "log").read_text()
    assert proc.returncode == 130, err
    assert "sd-rebasin: error: interrupted; no output written" in err and "Traceback" not in err
    assert list(folder.iterdir()) == []
