"""Loose ends of the command line: Ctrl-C while the package imports, `--json` when a command fails
and with its warnings, duplicate inputs named by every name, the `--device cuda` path run on the
CPU, and what re-basin did in each merge's summary.

Signal tests stop the child at a pause point first (`support.paused`): nothing depends on timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.paused import HANG_GUARD_SECONDS, MODULE, console_script, start_paused
from test_cli import assert_one_line_error, fragment, run_cli

from sd_mecha_rebasin.architectures.small import DEMO_LAYOUT, DEMO_LAYOUT_KEY
from sd_mecha_rebasin.cli.demo import make_models
from sd_mecha_rebasin.common.devices import cpu_standing_in_for_cuda
from sd_mecha_rebasin.files.output import write_safetensors

INTERRUPTED = "sd-rebasin: error: interrupted; no output written"

# --------------------------------------------------------------------------------------------
# Ctrl-C while the package imports


def interrupt_while_importing(tmp_path: pathlib.Path, entry: list[str], args: list[str]):
    """Start the child, wait until it is paused inside the package's import, send SIGINT."""
    proc, line = start_paused("importing", args, tmp_path, tmp_path / "log", entry)
    try:
        assert line.startswith("importing ")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=HANG_GUARD_SECONDS)  # a hang guard, not a timing: it exits at once
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, (tmp_path / "log").read_text()


@pytest.mark.parametrize(
    "entry, json_flag",
    [("console script", True), ("python -m", False)],
    ids=["console-script-json", "python-m"],
)
def test_ctrl_c_while_the_package_imports_is_one_line_and_130(tmp_path, entry, json_flag):
    argv = console_script() if entry == "console script" else MODULE
    args = ["inspect", "model.safetensors", *(["--json"] if json_flag else [])]
    rc, log = interrupt_while_importing(tmp_path, argv, args)
    assert rc == 130, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    lines = [line for line in log.splitlines() if line.strip()]
    assert INTERRUPTED in lines
    others = [line for line in lines if line != INTERRUPTED]
    if json_flag:  # stdout (in the same log) holds the failure object
        assert len(others) == 1, log
        assert json.loads(others[0]) == {
            "command": "inspect",
            "error": "interrupted; no output written",
            "exit_code": 130,
            "warnings": [],
        }
    else:
        assert others == [], log


def test_a_program_importing_the_package_keeps_keyboard_interrupt(tmp_path):
    """The guard is the command line's only: `import sd_mecha_rebasin` elsewhere is interrupted as usual."""
    rc, log = interrupt_while_importing(tmp_path, ["-c", "import sd_mecha_rebasin"], [])
    assert rc == -signal.SIGINT, log  # Python's exit on an uncaught KeyboardInterrupt
    assert "KeyboardInterrupt" in log and INTERRUPTED not in log


# --------------------------------------------------------------------------------------------
# --json: one object on stdout, failures and warnings included


@pytest.fixture
def frags(tmp_path, monkeypatch):
    """Two small SD1 fragments (enough for detection and validation, not for a merge)."""
    monkeypatch.chdir(tmp_path)
    return fragment(tmp_path / "A.safetensors", 0), fragment(tmp_path / "B.safetensors", 1)


def failure(capsys, *args: str) -> tuple[int, dict, str]:
    """Run a failing command with --json: its exit code, the one JSON object on stdout, the error line."""
    rc, out, err = run_cli(capsys, *args)
    assert len(out.splitlines()) == 1, out  # one object, nothing else
    obj = json.loads(out)
    assert set(obj) == {"command", "error", "exit_code", "warnings"}
    errors = [line for line in err.splitlines() if line.strip() and "sd-rebasin: warning: " not in line]
    assert "Traceback" not in err and errors == [f"sd-rebasin: error: {obj['error']}"], err
    assert rc != 0 and obj["exit_code"] == rc
    return rc, obj, err


@pytest.mark.parametrize(
    "args, command, rc, needle",
    [
        (["merge", "A.safetensors", "nope.safetensors"], "merge", 1, "nope.safetensors: no such file"),
        (
            ["align", "nope.safetensors", "--ref", "A.safetensors", "-o", "o.safetensors"],
            "align",
            1,
            "no such file",
        ),
        (
            ["merge-many", "A.safetensors", "nope.safetensors", "-o", "o.safetensors"],
            "merge-many",
            1,
            "no such file",
        ),
        (["inspect", "nope.safetensors"], "inspect", 1, "nope.safetensors: no such file"),
        (["merge", "A.safetensors", "B.safetensors", "--alpha", "2"], "merge", 2, "--allow-extrapolation"),
        (["merge", "A.safetensors", "--frobnicate"], "merge", 2, "--frobnicate"),  # usage: before the command
        (["merge-many", "A.safetensors", "-o", "o.safetensors"], "merge-many", 2, "at least 2 models"),
    ],
    ids=["merge", "align", "merge-many", "inspect", "merge-alpha", "usage", "merge-many-one"],
)
def test_json_failure_is_one_object_on_stdout(frags, capsys, args, command, rc, needle):
    got, obj, _ = failure(capsys, *args, "--json")
    assert got == rc and obj["command"] == command and needle in obj["error"] and obj["warnings"] == []


def test_json_failure_of_the_demo(tmp_path, capsys):
    (tmp_path / "A.safetensors").write_bytes(b"mine")
    rc, obj, _ = failure(capsys, "demo", "--out-dir", tmp_path, "--json")
    assert rc == 1 and obj["command"] == "demo" and "A.safetensors: already exists" in obj["error"]
    assert (tmp_path / "A.safetensors").read_bytes() == b"mine"


def test_json_failure_when_interrupted(frags, capsys, monkeypatch):
    import sd_mecha

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sd_mecha, "merge", interrupted)
    a = write_demo(pathlib.Path.cwd(), "A2", make_models(0)[0])
    rc, obj, _ = failure(capsys, "merge", a, a, "-o", "out.safetensors", "--json")
    assert (rc, obj["command"], obj["error"]) == (130, "merge", "interrupted; no output written")
    assert obj["warnings"] == ["A and B are both A2.safetensors; the merge gives that model back"]
    assert not pathlib.Path("out.safetensors").exists()


@pytest.mark.parametrize("quiet", [False, True], ids=["warnings-on-stderr-too", "quiet"])
def test_json_failure_lists_the_warnings_before_it(frags, capsys, quiet):
    a, _ = frags
    pathlib.Path("out.safetensors").write_bytes(b"keep")
    rc, obj, err = failure(
        capsys, "merge", a, a, "-o", "out.safetensors", "--json", *(["-q"] if quiet else [])
    )
    assert rc == 1 and "out.safetensors: already exists" in obj["error"]
    warning = "A and B are both A.safetensors; the merge gives that model back"
    assert obj["warnings"] == [warning]
    assert (f"sd-rebasin: warning: {warning}" in err) is not quiet  # -q: in the object only


# --------------------------------------------------------------------------------------------
# A file given under several names


@pytest.mark.parametrize(
    "names, expected",
    [
        (
            ["m1", "m2", "link"],
            "m1.safetensors and link.safetensors are one file (inputs 1 and 3): it counts twice",
        ),
        (
            ["m1", "link", "m1"],
            "m1.safetensors and link.safetensors are one file (inputs 1, 2 and 3): it counts 3 times",
        ),
        (["m1", "m2", "m1"], "m1.safetensors is given twice (inputs 1 and 3): it counts twice"),
        (["m1", "m2", "other/m1"], "m1.safetensors and other/m1.safetensors are one file (inputs 1 and 3)"),
    ],
    ids=["symlink", "symlink-and-twice", "same-path", "hard-link-same-name"],
)
def test_a_file_given_under_several_names_is_named_by_all(tmp_path, monkeypatch, capsys, names, expected):
    monkeypatch.chdir(tmp_path)
    fragment(tmp_path / "m1.safetensors", 0)
    fragment(tmp_path / "m2.safetensors", 1)
    os.symlink("m1.safetensors", tmp_path / "link.safetensors")
    (tmp_path / "other").mkdir()
    os.link(tmp_path / "m1.safetensors", tmp_path / "other" / "m1.safetensors")
    pathlib.Path("out.safetensors").write_bytes(b"keep")  # the run stops after the checks
    paths = [f"{n}.safetensors" for n in names]
    rc, obj, err = failure(capsys, "merge-many", *paths, "-o", "out.safetensors", "--json")
    assert rc == 1 and "already exists" in obj["error"]
    assert len(obj["warnings"]) == 1 and obj["warnings"][0].startswith(expected), obj["warnings"]
    assert f"sd-rebasin: warning: {obj['warnings'][0]}" in err


# --------------------------------------------------------------------------------------------
# Merges that run: warnings in the summary, what re-basin did, --device cuda on the CPU


def write_demo(folder: pathlib.Path, name: str, sd: dict[str, torch.Tensor]) -> pathlib.Path:
    path = folder / f"{name}.safetensors"
    write_safetensors(path, sd, {DEMO_LAYOUT_KEY: DEMO_LAYOUT})
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's A and B (B: a hidden legal permutation of A plus noise), the hidden permutation,
    the spec, and C: A plus small noise, not permuted (nothing to align)."""
    folder = tmp_path_factory.mktemp("loose")
    a, b, hidden, spec = make_models(0)
    gen = torch.Generator().manual_seed(5)
    c = {
        k: v + 1e-3 * v.std() * torch.randn(v.shape, generator=gen)
        if v.is_floating_point() and v.numel() > 1
        else v
        for k, v in a.items()
    }
    return write_demo(folder, "A", a), write_demo(folder, "B", b), write_demo(folder, "C", c), hidden, spec


def moved(perm) -> int:
    return int(np.count_nonzero(np.asarray(perm) != np.arange(len(perm))))


def test_merge_says_what_rebasin_moved(demo, tmp_path, monkeypatch, capsys):
    a, b, _, hidden, spec = demo
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "merge", a, b, "--threads", "2", "--json", "-o", "m.safetensors")
    assert rc == 0, err
    summary = json.loads(out)
    # the demo recovers the hidden permutation exactly (test_cli): it moves what the hidden one moved
    assert summary["units"] == sum(s.size for s in spec.spaces.values())
    assert summary["units_moved"] == sum(moved(p) for p in hidden.values()) > 0
    assert summary["permutations_changed"] == sum(1 for p in hidden.values() if moved(p))
    assert summary["equals_plain_weighted_sum"] is False and summary["warnings"] == []
    rc, out, err = run_cli(capsys, "merge", a, b, "--threads", "2", "-o", "t.safetensors")
    assert rc == 0, err
    line = next(line for line in out.splitlines() if line.startswith("re-basin:"))
    assert (
        f"{summary['permutations_changed']} of {summary['permutations']} permutations, "
        f"{summary['units_moved']} of {summary['units']} units moved; "
        f"||A - pi(B)|| / ||A - B|| = {summary['rel_distance']:.4f}"
    ) in line


def test_sd_mecha_read_window_fits_the_inputs(demo, tmp_path, monkeypatch, capsys):
    """The pair merge sizes sd-mecha's read windows from its inputs (`read_buffer_bytes`): the
    demo's files together, not sd-mecha's 256 MiB; real checkpoints keep the default. The output is
    the same bit for bit as with the default window."""
    import sd_mecha

    from sd_mecha_rebasin.mecha import recipes

    assert recipes.read_buffer_bytes(10) == 1 << 16
    assert recipes.read_buffer_bytes(5 << 20) == 5 << 20
    assert recipes.read_buffer_bytes(7 << 30) == recipes.SD_MECHA_BUFFER_BYTES == 1 << 28
    a, b, *_ = demo
    monkeypatch.chdir(tmp_path)
    seen, original = [], sd_mecha.merge

    def merge(*args, **kwargs):
        seen.append(kwargs["total_buffer_size"])
        return original(*args, **kwargs)

    monkeypatch.setattr(sd_mecha, "merge", merge)
    rc, _, err = run_cli(capsys, "merge", a, b, "--threads", "1", "-o", "small.safetensors")
    assert rc == 0, err
    assert seen == [a.stat().st_size + b.stat().st_size]
    monkeypatch.setattr(recipes, "read_buffer_bytes", lambda n: recipes.SD_MECHA_BUFFER_BYTES)
    rc, _, err = run_cli(capsys, "merge", a, b, "--threads", "1", "-o", "default.safetensors")
    assert rc == 0, err
    assert seen[-1] == 1 << 28
    small, default = load_file("small.safetensors"), load_file("default.safetensors")
    assert small.keys() == default.keys() and all(torch.equal(small[k], default[k]) for k in small)


def test_merge_that_moves_nothing_says_it_is_the_plain_weighted_sum(demo, tmp_path, monkeypatch, capsys):
    from sd_mecha_rebasin.cli.jobs import RunOptions, run

    a, _, c, _, spec = demo
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "merge", a, c, "--threads", "2", "--alpha", "0.3", "-o", "m.safetensors")
    assert rc == 0, err
    units = sum(s.size for s in spec.spaces.values())
    assert (
        f"re-basin: nothing moved (0 of {len(spec.spaces)} permutations, 0 of {units} units; 1 sweep(s), "
        "converged): this merge equals the plain weighted sum (1 - alpha) * A + alpha * B; "
        "re-basin was not needed for this pair"
    ) in out.splitlines()
    rc, out, err = run_cli(
        capsys, "merge", a, c, "--threads", "2", "--alpha", "0.3", "--json", "-o", "j.safetensors"
    )
    summary = json.loads(out)
    assert rc == 0 and summary["units_moved"] == 0 and summary["equals_plain_weighted_sum"] is True
    # and it is: the plain weighted sum, bit for bit
    run("average", a, c, "plain.safetensors", RunOptions(threads=1, quiet=True, progress=False), alpha=0.3)
    merged, plain = load_file("m.safetensors"), load_file("plain.safetensors")
    assert merged.keys() == plain.keys() and all(torch.equal(merged[k], plain[k]) for k in merged)
    rc, out, err = run_cli(capsys, "merge", a, c, "--threads", "2", "--iters", "0", "-o", "z.safetensors")
    assert rc == 0 and (
        "re-basin: --iters 0 aligns nothing: this merge equals the plain weighted sum (1 - alpha) * A + alpha * B"
        in out.splitlines()
    )


def test_json_summary_lists_the_warnings_also_under_quiet(demo, tmp_path, monkeypatch, capsys):
    a, *_ = demo
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "merge", a, a, "--threads", "2", "--iters", "1", "--json", "-q")
    assert rc == 0 and err == ""
    assert json.loads(out)["warnings"] == ["A and B are both A.safetensors; the merge gives that model back"]


def test_device_cuda_runs_its_path_on_the_cpu_with_the_cpu_result(demo, tmp_path, monkeypatch, capsys):
    """`--device cuda` end to end (the device check, the merge method's setting, the products'
    device path), the CPU standing in for the GPU: the outputs of merge and merge-many equal the
    CPU's, tensor for tensor."""
    a, b, *_ = demo
    monkeypatch.chdir(tmp_path)
    outputs = {}
    for device in ("cpu", "cuda"):
        with cpu_standing_in_for_cuda() if device == "cuda" else contextlib.nullcontext():
            for command in ("merge", "merge-many"):
                out_file = f"{command}-{device}.safetensors"
                rc, out, err = run_cli(
                    capsys, command, a, b, "-o", out_file, "--device", device, "--threads", "2", "-q"
                )
                assert rc == 0, err
                outputs[command, device] = load_file(out_file)
    for command in ("merge", "merge-many"):
        cpu, cuda = outputs[command, "cpu"], outputs[command, "cuda"]
        assert cpu.keys() == cuda.keys() and all(torch.equal(cpu[k], cuda[k]) for k in cpu), command
    with cpu_standing_in_for_cuda():  # the stand-in is one GPU: the device check still counts
        rc, _, err = run_cli(capsys, "merge", a, b, "--device", "cuda:1")
        assert_one_line_error(rc, err, 1, "--device cuda:1: no such GPU (1 visible)")
