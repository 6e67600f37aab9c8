"""The output is never seen half-written, and disk problems are one line naming the folder.

The kill tests run the real command line in a child process that stops at a known point (the
`SD_REBASIN_TEST_PAUSE` hook says so through a pipe, then blocks), so the signal arrives exactly
there by construction, never by timing.
"""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import psutil
import pytest
import torch
from safetensors.torch import load_file
from support.demo_files import write_demo_pair
from support.paused import start_paused

import sd_mecha_rebasin.files.output as output
from sd_mecha_rebasin.cli.commands import main
from sd_mecha_rebasin.cli.jobs import DTYPES, expected_output_bytes
from sd_mecha_rebasin.common.errors import UserError
from sd_mecha_rebasin.files.checkpoint import detect_family, open_checkpoint
from sd_mecha_rebasin.files.output import PARTIAL_MARK, AtomicOutput, partial_path, remove_stale_partials

NO_SUCH_PID = 2**22 + 1
"""Above Linux's largest possible pid_max (2^22): never a running process."""


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    return write_demo_pair(tmp_path_factory.mktemp("atomic"))


def merge_args(a: pathlib.Path, b: pathlib.Path, *extra: str, output: str = "out.safetensors") -> list[str]:
    return ["merge", str(a), str(b), "-o", output, "--threads", "1", *extra]


@pytest.mark.parametrize(
    "point, previous",
    [("merging", False), ("merging", True), ("writing", True), ("written", False), ("written", True)],
)
def test_kill_9_leaves_nothing_or_the_previous_file(demo_pair, tmp_path, capsys, point, previous):
    a, b = demo_pair
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "out.safetensors"
    old = b"the previous complete file"
    if previous:
        target.write_bytes(old)
    extra = ["--overwrite"] if previous else []
    proc, line = start_paused(point, merge_args(a, b, *extra), folder, tmp_path / "log")
    try:
        assert line == f"{point} {proc.pid}\n"
        partial = partial_path(target, proc.pid)
        assert partial.name == f".out.safetensors{PARTIAL_MARK}{proc.pid}"
        size_at_kill = partial.stat().st_size
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the target is untouched; the partial file says what it is
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [partial.name] + (["out.safetensors"] if previous else [])
    )
    if previous:
        assert target.read_bytes() == old
    if point == "merging":
        assert size_at_kill == 0
    elif point == "writing":  # the header and the first tensor, not the rest
        assert 8 < size_at_kill < a.stat().st_size // 2
    else:  # complete but not yet in place
        assert len(load_file(str(partial))) == len(load_file(str(a)))

    # the next run into the folder removes it, says so, and writes the target
    rc = main(merge_args(a, b, "--iters", "0", "--overwrite", output=str(target)))
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert f"removed 1 partial file(s) that an interrupted run left in {folder}: {partial.name}" in err
    assert sorted(p.name for p in folder.iterdir()) == ["out.safetensors"]
    assert len(load_file(str(target))) == len(load_file(str(a)))


def test_stale_partials_of_gone_processes_only(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        gone = tmp_path / f".a.safetensors{PARTIAL_MARK}{NO_SUCH_PID}"
        running = tmp_path / f".b.safetensors{PARTIAL_MARK}{live.pid}"
        reused = tmp_path / f".c.safetensors{PARTIAL_MARK}{live.pid}"  # older than that process
        mine = partial_path(tmp_path / "d.safetensors")
        others = [tmp_path / ".e.safetensors.tmp", tmp_path / f"f{PARTIAL_MARK}x", tmp_path / "g.safetensors"]
        for path in [gone, running, reused, mine, *others]:
            path.write_bytes(b"x")
        started = psutil.Process(live.pid).create_time()
        os.utime(reused, (started - 3600, started - 3600))
        assert remove_stale_partials(tmp_path) == sorted([gone, reused])
        assert sorted(tmp_path.iterdir()) == sorted([running, mine, *others])
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------------------------
# Full disk, read-only folder, not enough free space


def _assert_one_line(rc: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("sd-rebasin: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_enospc_while_writing_names_the_folder(tmp_path, monkeypatch):
    real_write = output.write_safetensors

    def full_disk(path, tensors, metadata=None, on_progress=None):
        real_write(path, dict(list(tensors.items())[:1]), metadata)  # a first part reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output, "write_safetensors", full_disk)
    target = tmp_path / "out.safetensors"
    with pytest.raises(UserError) as info:
        with AtomicOutput(target) as out:
            out.commit({"w": torch.zeros(4), "v": torch.ones(4)}, None)
    assert str(info.value) == f"{tmp_path}: no space left on the device (writing out.safetensors)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "code, problem",
    [
        (errno.EROFS, "output directory is not writable (read-only file system)"),
        (errno.EACCES, "output directory is not writable (Permission denied)"),
        (errno.ENOSPC, "no space left on the device (writing out.safetensors)"),
    ],
)
def test_creating_the_output_fails_with_one_line(demo_pair, tmp_path, monkeypatch, capsys, code, problem):
    a, b = demo_pair
    folder = tmp_path / "out"
    folder.mkdir()
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if pathlib.Path(path).parent == folder:
            raise OSError(code, os.strerror(code))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(output.os, "open", refuse)
    rc = main(["merge", str(a), str(b), "-o", str(folder / "out.safetensors")])
    _, err = capsys.readouterr()
    _assert_one_line(rc, err, f"{folder}: {problem}")
    assert list(folder.iterdir()) == []


def test_enospc_in_a_real_merge_leaves_nothing(demo_pair, tmp_path, monkeypatch, capsys):
    a, b = demo_pair

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output, "write_safetensors", full_disk)
    folder = tmp_path / "out"
    folder.mkdir()
    rc = main(merge_args(a, b, "--iters", "0", "-q", output=str(folder / "m.safetensors")))
    _, err = capsys.readouterr()
    _assert_one_line(rc, err, f"{folder}: no space left on the device (writing m.safetensors)")
    assert list(folder.iterdir()) == []


def test_expected_output_size_is_the_real_size(demo_pair, tmp_path):
    a, b = demo_pair
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "m.safetensors"
    ckpt_a, ckpt_b = _detected(a, b)
    sizes = {}
    for dtype in ("fp16", "fp32"):
        args = ["-q", "--overwrite", "--iters", "0", "--output-dtype", dtype]
        assert main(merge_args(a, b, *args, output=str(target))) == 0
        data = target.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        sizes[dtype] = len(data) - header
        assert expected_output_bytes("merge", ckpt_a, ckpt_b, DTYPES[dtype]) == sizes[dtype]
    assert sizes["fp32"] > 1.9 * sizes["fp16"]  # the weights follow --output-dtype


def test_not_enough_free_space_is_said_before_the_merge(demo_pair, tmp_path, monkeypatch, capsys):
    import sd_mecha

    a, b = demo_pair
    merges = []
    monkeypatch.setattr(sd_mecha, "merge", lambda *args, **kwargs: merges.append(1))
    real_usage = shutil.disk_usage

    def usage(path):
        real = real_usage(path)
        return type(real)(real.total, real.used, 5_000_000)

    monkeypatch.setattr(output.shutil, "disk_usage", usage)
    folder = tmp_path / "out"
    folder.mkdir()
    rc = main(merge_args(a, b, "--output-dtype", "fp32", output=str(folder / "m.safetensors")))
    _, err = capsys.readouterr()
    needed = expected_output_bytes("merge", *_detected(a, b), DTYPES["fp32"])
    _assert_one_line(
        rc,
        err,
        f"{folder}: not enough free space for m.safetensors: it needs about {needed / 1e6:.1f} MB, 5.0 MB free",
    )
    assert merges == [] and list(folder.iterdir()) == []


def _detected(a: pathlib.Path, b: pathlib.Path):
    ckpt_a, ckpt_b = open_checkpoint(a), open_checkpoint(b)
    detect_family(ckpt_a)
    return ckpt_a, ckpt_b
