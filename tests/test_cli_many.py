"""`sd-rebasin merge-many` end to end on the demo's small SD1-layout models."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_cli import assert_one_line_error, config_shapes, run_cli, sparse

from sd_mecha_rebasin import apply_permutation, random_permutation
from sd_mecha_rebasin.cli.demo import random_weights, scheduler_buffers
from sd_mecha_rebasin.cli.many_job import merge_many_files
from sd_mecha_rebasin.files.output import write_safetensors

N = 3
LAYOUT = {"sd_rebasin_layout": "demo-small-sd1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """N demo-layout files: model i = hidden_i(A) + 1% noise (hidden_0 = identity), plus buffers."""
    from sd_mecha_rebasin import permutation_spec
    from sd_mecha_rebasin.architectures.small import SMALL_ARCH, small_shapes
    from sd_mecha_rebasin.cli.demo import CONFIG

    directory = tmp_path_factory.mktemp("many")
    shapes = small_shapes()
    spec = permutation_spec(CONFIG, arch=SMALL_ARCH, shapes=shapes)
    base = random_weights(shapes, seed=0)
    extras = {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    extras.update(scheduler_buffers())
    paths, hidden = [], []
    for i in range(N):
        perm = random_permutation(spec, seed=50 + i) if i else {}
        gen = torch.Generator().manual_seed(90 + i)
        noisy = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        sd = apply_permutation(spec, perm, noisy)
        path = directory / f"m{i + 1}.safetensors"
        write_safetensors(path, {**sd, **extras}, LAYOUT)
        paths.append(path)
        hidden.append(perm)
    return paths, base, hidden, spec


def rel_distance(x, y, keys) -> float:
    num = sum(float((x[k].double() - y[k].double()).square().sum()) for k in keys)
    den = sum(float(y[k].double().square().sum()) for k in keys)
    return math.sqrt(num / den)


def test_merge_many_writes_the_aligned_mean_with_metadata(inputs, tmp_path, capsys, monkeypatch):
    import sys

    paths, base, _, spec = inputs
    out = tmp_path / "many.safetensors"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # progress is shown on terminals
    rc, stdout, err = run_cli(capsys, "merge-many", *paths, "-o", out, "--threads", "1")
    assert rc == 0, err
    assert "pass 1, model 2 of 3 (m2.safetensors; " in err or "pass 1, model 3 of 3 (m3.safetensors; " in err
    assert "1 of 2 to align in this pass" in err and "pass ETA" in err
    assert f"wrote {out}" in stdout and "converged" in stdout
    merged = load_file(out)
    first = load_file(paths[0])
    assert list(merged) == list(first)  # the reference's keys, in its order
    keys = [k for k in spec.axes if k in merged]
    ours = rel_distance(merged, base, keys)
    models = [load_file(p) for p in paths]
    plain = rel_distance({k: sum(m[k].float() for m in models) / N for k in keys}, base, keys)
    assert ours < 0.01 and plain > 0.3, (ours, plain)
    assert torch.equal(merged["betas"], first["betas"])  # buffers kept from the reference
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    models = json.loads(meta["sd_merge_models"])
    for p in paths:
        assert hashlib.sha256(p.read_bytes()).hexdigest() in models
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["models"] == [p.name for p in paths] and recipe["reference"] == "m1.safetensors"
    assert meta["modelspec.merged_from"] == ", ".join(p.name for p in paths)
    assert str(tmp_path) not in json.dumps(meta)  # names, never paths


def test_json_reports_every_pass(inputs, tmp_path, capsys):
    paths, *_ = inputs
    rc, stdout, err = run_cli(
        capsys, "merge-many", *paths, "-o", tmp_path / "o.safetensors", "--json", "--weights", "1,2,1"
    )
    assert rc == 0, err
    report = json.loads(stdout)
    assert report["command"] == "merge-many" and report["converged"] is True
    assert report["weights"] == pytest.approx([0.25, 0.5, 0.25])
    assert len(report["passes"]) >= 1
    assert {"objective", "mean_distance", "models_changed", "sweeps", "seconds"} <= set(report["passes"][0])
    assert report["permutations_changed"][0] == 0 and min(report["permutations_changed"][1:]) > 0
    assert report["running_sum_dtype"] == "float32"  # float32 inputs: a float32 sum, never rebuilt
    assert all(p["rebuild_seconds"] == 0 for p in report["passes"])


def test_half_precision_inputs_use_a_half_sum_rebuilt_after_pass_one(inputs, tmp_path, capsys, monkeypatch):
    import sys

    paths, base, _, spec = inputs
    half = []
    for p in paths:
        sd = load_file(p)
        path = tmp_path / p.name
        write_safetensors(path, {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, LAYOUT)
        half.append(path)
    out = tmp_path / "o.safetensors"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, stdout, err = run_cli(capsys, "merge-many", *half, "-o", out, "--json", "--threads", "2")
    assert rc == 0, err
    report = json.loads(stdout)
    assert report["running_sum_dtype"] == "float16"
    assert report["passes"][0]["rebuild_seconds"] > 0  # pass 1 moved models: the sum was rebuilt
    assert "pass 1: rebuilding the running sum from the 3 models" in err
    assert "running sum rebuilt in" in err
    merged = load_file(out)
    keys = [k for k in spec.axes if k in merged]
    assert rel_distance(merged, base, keys) < 0.01


def test_ref_puts_the_output_in_that_models_basis(inputs, tmp_path):
    paths, base, hidden, spec = inputs
    from sd_mecha_rebasin.cli.jobs import RunOptions

    out = tmp_path / "ref2.safetensors"
    res = merge_many_files(
        paths, out, ref=paths[1], options=RunOptions(threads=1, quiet=True, progress=False)
    )
    assert res.ref == 1 and res.permutations_changed[1] == 0
    merged = load_file(out)
    keys = [k for k in spec.axes if k in merged]
    assert rel_distance(merged, apply_permutation(spec, hidden[1], base), keys) < 0.01
    assert rel_distance(merged, base, keys) > 0.3


def test_the_same_file_twice_warns(inputs, tmp_path, capsys):
    paths, *_ = inputs
    rc, _, err = run_cli(
        capsys, "merge-many", paths[0], paths[1], paths[0], "-o", tmp_path / "t.safetensors", "-q"
    )
    assert rc == 0, err
    assert err == ""  # --quiet silences it
    rc, _, err = run_cli(capsys, "merge-many", paths[0], paths[1], paths[0], "-o", tmp_path / "u.safetensors")
    assert rc == 0, err
    assert "warning: m1.safetensors is given twice (inputs 1 and 3)" in err


def test_mixed_families_name_the_odd_file_and_both_families(inputs, tmp_path, capsys):
    paths, *_ = inputs
    xl = sparse(tmp_path / "xl.safetensors", config_shapes("sdxl-sgm", ("clip_l", "clip_g", "diffuser")))
    rc, _, err = run_cli(capsys, "merge-many", paths[0], xl, paths[1], "-o", tmp_path / "o.safetensors")
    assert_one_line_error(rc, err, 1, "xl.safetensors: is SDXL (sdxl-sgm)", "SD1 (sd1-ldm)")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    ("args", "rc", "needles"),
    [
        ((0,), 2, ("at least 2 models, got 1",)),
        ((0, 1, 2, "--weights", "1,1"), 2, ("--weights: got 2 weights for 3 models",)),
        ((0, 1, "--weights", "1,-1"), 2, ("weight 2 is -1.0",)),
        ((0, 1, "--weights", "0,0"), 2, ("the weights sum to 0",)),
        ((0, 1, "--weights", "a,b"), 2, ("--weights 'a,b': expected 2 comma-separated numbers",)),
        (
            (0, 1, "--ref", "elsewhere.safetensors"),
            2,
            ("elsewhere.safetensors: --ref is not one of the input",),
        ),
        ((0, "missing.safetensors"), 1, ("missing.safetensors",)),
    ],
)
def test_bad_input_is_one_line(inputs, tmp_path, capsys, args, rc, needles):
    paths, *_ = inputs
    argv = [paths[a] if isinstance(a, int) else a for a in args]
    out = tmp_path / "bad.safetensors"
    code, _, err = run_cli(capsys, "merge-many", *argv, "-o", out)
    assert_one_line_error(code, err, rc, *needles)
    assert not out.exists()


def test_output_that_is_an_input_or_exists(inputs, tmp_path, capsys):
    paths, *_ = inputs
    rc, _, err = run_cli(capsys, "merge-many", *paths, "-o", paths[1])
    assert_one_line_error(rc, err, 1, "is an input")
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    rc, _, err = run_cli(capsys, "merge-many", *paths, "-o", existing)
    assert rc == 1 and "--overwrite" in err
    assert existing.read_bytes() == b"keep me"


def test_recovers_the_hidden_permutations(inputs, tmp_path):
    paths, _, hidden, spec = inputs
    from sd_mecha_rebasin.cli.jobs import RunOptions
    from sd_mecha_rebasin.permutations.spec import invert

    progress = []
    res = merge_many_files(
        paths,
        tmp_path / "r.safetensors",
        options=RunOptions(quiet=True, progress=False),
        on_progress=progress.append,
    )
    assert res.converged and progress
    # Recompute with the library to read the permutations (the job reports counts only).
    from sd_mecha_rebasin import merge_many
    from sd_mecha_rebasin.files.checkpoint import detect_family, open_checkpoint
    from sd_mecha_rebasin.files.lazy import FileStateDict

    models = []
    for p in paths:
        c = open_checkpoint(p)
        detect_family(c)
        models.append(FileStateDict(c))
    perms = merge_many(spec, models, threads=1).perms
    for i in range(1, N):
        expected = invert(hidden[i])  # the reference (model 1) is unpermuted
        assert all(np.array_equal(perms[i][n], expected[n]) for n in spec.spaces)


def test_save_recipe_writes_a_loadable_mecha_file(inputs, tmp_path, capsys):
    import sd_mecha

    paths, *_ = inputs
    out, mecha = tmp_path / "r.safetensors", tmp_path / "r.mecha"
    rc, _, err = run_cli(
        capsys, "merge-many", *paths, "-o", out, "--save-recipe", mecha, "--weights", "1,1,2", "-q"
    )
    assert rc == 0, err
    text = mecha.read_text()
    assert '"git_rebasin_many"' in text and str(tmp_path) not in text
    assert all(f'model "{p.name}"' in text for p in paths)
    again = sd_mecha.deserialize(text.splitlines())  # the plugin is imported: it loads
    assert sd_mecha.serialize(again, finalize=False) == text
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["mecha_recipe"] == text


def test_an_inpainting_input_among_plain_ones_is_refused_by_name(inputs, tmp_path, capsys):
    """Only models of one kind average: a 9-channel first conv among 4-channel ones is named."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from support import quirks

    paths, *_ = inputs
    inpaint = quirks.with_input_channels(load_file(str(paths[1])), 9)
    odd = tmp_path / "inpaint.safetensors"
    write_safetensors(odd, inpaint, LAYOUT)
    out = tmp_path / "o.safetensors"
    rc, _, err = run_cli(capsys, "merge-many", paths[0], odd, paths[2], "-o", out)
    assert_one_line_error(rc, err, 1, "inpaint.safetensors: is an inpainting model (9 UNet input channels)")
    assert "m1.safetensors is a standard model (4)" in err and not out.exists()


def test_stale_partial_files_and_extra_bytes_are_reported(inputs, tmp_path, capsys):
    """The same input checks and output hygiene as `merge`: a partial file left by a killed run is
    removed and named; bytes after an input's last tensor are accepted with one warning."""
    paths, *_ = inputs
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(paths[1].read_bytes() + b"\0" * 24)
    stale = tmp_path / ".o.safetensors.sd-rebasin-partial-999999999"
    stale.write_bytes(b"half")
    out = tmp_path / "o.safetensors"
    rc, _, err = run_cli(capsys, "merge-many", paths[0], padded, paths[2], "-o", out)
    assert rc == 0, err
    assert "padded.safetensors: 24 byte(s) after or between its tensors" in err
    assert "removed 1 partial file(s)" in err and stale.name in err
    assert out.exists() and not stale.exists()


def test_fp8_inputs_and_iters_zero(inputs, tmp_path, capsys):
    """fp8 files merge (widened exactly before any arithmetic); --iters 0 stops after one pass and says why."""
    paths, base, _, spec = inputs
    fp8 = []
    for p in paths:
        sd = load_file(p)
        path = tmp_path / p.name
        write_safetensors(
            path,
            {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in sd.items()},
            LAYOUT,
        )
        fp8.append(path)
    rc, stdout, err = run_cli(capsys, "merge-many", *fp8, "-o", tmp_path / "o.safetensors", "--json")
    assert rc == 0, err
    report = json.loads(stdout)
    assert report["running_sum_dtype"] == "float16" and report["converged"] is True
    assert min(report["permutations_changed"][1:]) > 0
    rc, stdout, err = run_cli(capsys, "merge-many", *paths, "-o", tmp_path / "z.safetensors", "--iters", "0")
    assert rc == 0, err
    assert "MergeMany: 1 pass(es), stopped: --iters 0 aligns nothing" in stdout


def test_start_all_others_on_shared_basis_files_is_one_pass_and_the_weighted_mean(inputs, tmp_path, capsys):
    """Fine-tunes of one base (no permutation): --start all-others aligns N - 1 models once, reports
    each one and says plainly that the merge is the weighted mean; --low-memory finds the same."""
    paths, *_ = inputs
    shared = [paths[0]]
    first = load_file(paths[0])
    for i in (1, 2):
        gen = torch.Generator().manual_seed(190 + i)
        sd = {
            k: v + 0.01 * v.std() * torch.randn(v.shape, generator=gen)
            if v.is_floating_point() and v.numel() > 1
            else v
            for k, v in first.items()
        }
        path = tmp_path / f"s{i + 1}.safetensors"
        write_safetensors(path, sd, LAYOUT)
        shared.append(path)
    for extra in ([], ["--low-memory"]):
        out = tmp_path / f"o{len(extra)}.safetensors"
        args = ["merge-many", *shared, "-o", out, "--start", "all-others", "--threads", "2", *extra]
        rc, stdout, err = run_cli(capsys, *args, "--json")
        assert rc == 0, err
        report = json.loads(stdout)
        assert report["start"] == "all-others" and report["low_memory"] == bool(extra)
        assert report["restarted"] is False
        assert len(report["passes"]) == 1 and report["equals_weighted_mean"] is True
        assert [a["name"] for a in report["alignments"]].count("s2.safetensors") == 1
        assert len(report["alignments"]) == N - 1
        assert all(
            a["units_moved"] == 0 and a["distance"] <= a["distance_before"] * (1 + 1e-6)
            for a in report["alignments"]
        )
        assert report["running_sum_dtype"] == ("float16" if extra else "float32")
        merged = load_file(out)
        models = [load_file(p) for p in shared]
        for k in list(merged)[:20]:
            if merged[k].is_floating_point():
                want = sum(m[k].float() for m in models) / N
                torch.testing.assert_close(merged[k].float(), want, rtol=1e-3, atol=1e-5)  # fp16 output
    rc, stdout, err = run_cli(capsys, *args[:-1], "--overwrite")
    assert rc == 0, err
    assert "nothing moved: the merge equals the weighted mean of the inputs" in stdout
    assert "1 pass(es), converged; 2 alignment(s) (all-others start)" in stdout


def test_a_bad_start_is_a_usage_error(inputs, tmp_path, capsys):
    paths, *_ = inputs
    rc, _, err = run_cli(capsys, "merge-many", *paths, "-o", tmp_path / "x.safetensors", "--start", "paper")
    assert rc == 2 and "paper" in err and "all-others" in err


def _shared_basis_files(first_path, directory, dtype=torch.float16):
    """The first input and two fine-tune-like copies of it (no permutation), as `dtype` files."""
    first = load_file(first_path)
    paths = []
    for i in range(3):
        gen = torch.Generator().manual_seed(290 + i)
        sd = {
            k: (v + (0.01 * v.std() * torch.randn(v.shape, generator=gen) if i else 0)).to(dtype)
            if v.is_floating_point() and v.numel() > 1
            else v
            for k, v in first.items()
        }
        path = directory / f"f{i + 1}.safetensors"
        write_safetensors(path, sd, LAYOUT)
        paths.append(path)
    return paths


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_full_search_writes_the_same_file_as_the_certificate(inputs, tmp_path, capsys, dtype):
    """Fine-tunes of one base: by default every alignment is proved unmoved (no product); the file
    and the report equal --full-search's, tensor for tensor (fp16 inputs: the output takes the
    running sum; fp32: the output pass)."""
    paths = _shared_basis_files(inputs[0][0], tmp_path, dtype)
    reports, outs = [], []
    for extra in ([], ["--full-search"]):
        out = tmp_path / f"out{len(extra)}.safetensors"
        rc, stdout, err = run_cli(capsys, "merge-many", *paths, "-o", out, "--threads", "2", "--json", *extra)
        assert rc == 0, err
        reports.append(json.loads(stdout))
        outs.append(load_file(out))
    fast, full = reports
    assert fast["full_search"] is False and full["full_search"] is True
    assert all(a["certified"] + a["exact_rows"] > 0 and a["searched"] == 0 for a in fast["alignments"])
    assert all(a["certified"] == a["exact_rows"] == 0 and a["searched"] > 0 for a in full["alignments"])
    keep = ("name", "pass_index", "gain", "distance", "distance_before", "changed", "units_moved", "sweeps")
    assert [{k: a[k] for k in keep} for a in fast["alignments"]] == [
        {k: a[k] for k in keep} for a in full["alignments"]
    ]
    assert [p["objective"] for p in fast["passes"]] == [p["objective"] for p in full["passes"]]
    assert fast["equals_weighted_mean"] and list(outs[0]) == list(outs[1])
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_nan_in_a_permuted_key_is_one_line_naming_the_file(inputs, tmp_path, capsys):
    """The permuted keys are checked by MergeMany's first read of every model, not a separate scan:
    the error is the same one line, and nothing is written."""
    paths = _shared_basis_files(inputs[0][0], tmp_path)
    sd = {k: v.clone() for k, v in load_file(paths[2]).items()}  # (not a view of the file we replace)
    key = next(k for k in sd if "attn2.to_k.weight" in k)
    sd[key][0, 0] = float("nan")
    paths[2].unlink()
    write_safetensors(paths[2], sd, LAYOUT)
    out = tmp_path / "o.safetensors"
    rc, _, err = run_cli(capsys, "merge-many", *paths, "-o", out)
    assert_one_line_error(rc, err, 1, "f3.safetensors", key, "NaN")
    assert not out.exists()
