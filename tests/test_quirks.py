"""Checkpoints as users have them: quirky files open, merge with the right values, or fail in one line.

Each test builds its files with tests/support/quirks.py (tiny models of the real key layouts) and
asserts the values that come out: keys, dtypes, position ids, shapes and merged weights.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file
from support import quirks
from support.quirks import SD1_CLIP, UNET

from sd_mecha_rebasin.checkpoint import UserError, detect_family, open_checkpoint
from sd_mecha_rebasin.cli import main
from sd_mecha_rebasin.jobs import RunOptions, run

POSITION_IDS = SD1_CLIP + "embeddings.position_ids"
NEVER_PERMUTED = UNET + "out.2.bias"  # the UNet's output channels (latents) are never permuted


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1, err
    assert len(lines) == 1 and lines[0].startswith("sd-rebasin: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("sd-rebasin: warning:")]


def average(a: pathlib.Path, b: pathlib.Path, out: pathlib.Path, **options) -> dict[str, torch.Tensor]:
    """The plain weighted sum through the CLI's pipeline (same checks and output assembly, no sweeps)."""
    run("average", a, b, out, RunOptions(threads=2, quiet=options.pop("quiet", True), **options))
    return load_file(str(out))


def sd_mecha_read(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of a file as sd-mecha's own safetensors reader returns it."""
    from sd_mecha.extensions import model_formats

    reader = model_formats.resolve("single_file").get_read_dict(path, 1 << 20)
    try:
        return {k: reader[k] for k in reader.keys()}
    finally:
        reader.close()


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


# --------------------------------------------------------------------------------------------
# 1. The header length's low byte is the first byte of the file: any value is valid


def test_every_header_length_modulo_256_opens_and_reads(tmp_path):
    tensors = quirks.fragment()
    minimum = len(quirks.header_json(tensors, quirks.DEMO_META))
    lengths = [quirks.length_with_residue(minimum, r) for r in range(256)]
    # lengths whose first two bytes are a pickle's PROTO opcode and protocol (0x80, 2..5)
    lengths += [0x80 + (p << 8) for p in range(2, 6) if 0x80 + (p << 8) >= minimum]
    assert any(n >> 8 & 0xFF in range(2, 6) and n & 0xFF == 0x80 for n in lengths)
    for n in lengths:
        path = quirks.save(tmp_path / f"h{n}.safetensors", tensors, header_length=n)
        assert path.read_bytes()[0] == n & 0xFF
        ckpt = open_checkpoint(path)
        assert detect_family(ckpt) == "sd1-ldm" and ckpt.shapes == {
            k: tuple(v.shape) for k, v in tensors.items()
        }
        assert_same(dict(ckpt.iter_tensors(list(tensors))), tensors)  # our reader
        assert_same(sd_mecha_read(path), tensors)  # sd-mecha's reader, which the merge uses
        assert_same(load_file(str(path)), tensors)  # the reference implementation
        path.unlink()


def test_header_length_0x80_merges_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sd_a, sd_b = quirks.small_pair()
    minimum = max(len(quirks.header_json(sd, quirks.DEMO_META)) for sd in (sd_a, sd_b))
    n_a = quirks.length_with_residue(minimum, 0x80)
    n_a += (2 - (n_a >> 8)) % 256 << 8  # second byte 2 as well: b"\x80\x02", a pickle's PROTO 2
    a = quirks.save(tmp_path / "A.safetensors", sd_a, header_length=n_a)
    b = quirks.save(tmp_path / "B.safetensors", sd_b, header_length=quirks.length_with_residue(minimum, 0x80))
    assert a.read_bytes()[0] == 0x80 and 2 <= a.read_bytes()[1] <= 5 and b.read_bytes()[0] == 0x80
    rc, _, err = cli(capsys, "merge", a, b, "--threads", "2", "--iters", "3", "--output-dtype", "fp32", "-q")
    assert rc == 0, err
    merged = load_file("merged.safetensors")
    assert list(merged) == list(sd_a)
    expected = torch.lerp(sd_a[NEVER_PERMUTED], sd_b[NEVER_PERMUTED], 0.5)
    assert torch.equal(merged[NEVER_PERMUTED], expected)
    rc, out, err = cli(capsys, "inspect", a, "--json")
    assert rc == 0 and json.loads(out)["format"] == "safetensors", err


def test_pickles_are_recognised_by_their_full_signature(tmp_path, capsys):
    tensors = quirks.fragment()
    zipped = tmp_path / "zip.ckpt"
    torch.save(tensors, zipped)
    legacy = tmp_path / "legacy.ckpt"
    torch.save(tensors, legacy, _use_new_zipfile_serialization=False)
    assert zipped.read_bytes()[:4] == b"PK\x03\x04" and legacy.read_bytes()[:2] == b"\x80\x02"
    for path in (zipped, legacy):
        assert open_checkpoint(path).kind == "pickle"
        misnamed = path.with_name(path.stem + "_misnamed.safetensors")
        misnamed.write_bytes(path.read_bytes())
        with pytest.raises(
            UserError, match="not a safetensors file: it is a PyTorch (zip|pickle) checkpoint"
        ):
            open_checkpoint(misnamed)
    # a safetensors file named .ckpt whose first bytes look like a pickle's (0x80, 0x02)
    minimum = len(quirks.header_json(tensors, None))
    n = quirks.length_with_residue(minimum, 0x80)
    n += (2 - (n >> 8)) % 256 << 8
    st = quirks.save(tmp_path / "st.ckpt", tensors, metadata=None, header_length=n)
    assert st.read_bytes()[:2] == b"\x80\x02"
    with pytest.raises(UserError, match="is a safetensors file named .ckpt; rename it to .safetensors"):
        open_checkpoint(st)
    # 0x80 followed by anything but a protocol number is not a pickle
    odd = tmp_path / "odd.ckpt"
    odd.write_bytes(b"\x80\x09" + b"\x00" * 64)
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        open_checkpoint(odd)


# --------------------------------------------------------------------------------------------
# 4. Bytes after the last tensor


def test_bytes_after_the_last_tensor_are_ignored_with_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sd_a, sd_b = quirks.small_pair()
    a = quirks.save(tmp_path / "A.safetensors", sd_a, trailing=b"\x00" * 1234)
    b = quirks.save(tmp_path / "B.safetensors", sd_b)
    with pytest.raises(Exception, match="not fully covered|incomplete metadata"):
        load_file(str(a))  # the reference implementation refuses such files
    assert open_checkpoint(a).extra_bytes == 1234
    rc, _, err = cli(capsys, "merge", a, b, "--threads", "2", "--iters", "3", "--output-dtype", "fp32")
    assert rc == 0, err
    warned = warnings_in(err)
    assert len(warned) == 1 and "A.safetensors" in warned[0] and "1234 byte(s)" in warned[0], err
    merged = load_file("merged.safetensors")
    assert list(merged) == list(sd_a)
    assert torch.equal(merged[NEVER_PERMUTED], torch.lerp(sd_a[NEVER_PERMUTED], sd_b[NEVER_PERMUTED], 0.5))
    for key in ("alphas_cumprod", POSITION_IDS):
        assert torch.equal(merged[key], sd_a[key]), key


# --------------------------------------------------------------------------------------------
# 5. CLIP position_ids: always the exact int64 0..76


def _interpolated() -> torch.Tensor:
    return torch.linspace(0, 76 * 0.583, 77).half().unsqueeze(0)  # 0, 0.583, 1.166, ... in float16


@pytest.mark.parametrize(
    "broken, warned",
    [
        (None, "missing (added)"),
        (_interpolated(), "was float16 [1, 77] (0, 0.583"),
        (torch.arange(77, dtype=torch.float32).unsqueeze(0), "was float32 [1, 77]"),
        (torch.arange(77), "was int64 [77]"),
        (torch.arange(77).unsqueeze(0), None),
    ],
    ids=["missing", "interpolated-fp16", "exact-fp32", "flat-int64", "correct"],
)
def test_position_ids_are_always_exact(tmp_path, capsys, broken, warned):
    sd_a, sd_b = quirks.small_pair()
    if broken is None:
        del sd_a[POSITION_IDS]
    else:
        sd_a[POSITION_IDS] = broken
    sd_b[POSITION_IDS] = _interpolated()  # B's are never used
    a = quirks.save(tmp_path / "A.safetensors", sd_a)
    b = quirks.save(tmp_path / "B.safetensors", sd_b)
    capsys.readouterr()
    merged = average(a, b, tmp_path / "out.safetensors", quiet=False)
    ids = merged[POSITION_IDS]
    assert ids.dtype == torch.int64 and ids.shape == (1, 77) and torch.equal(ids[0], torch.arange(77))
    warned_lines = warnings_in(capsys.readouterr().err)
    if warned is None:
        assert warned_lines == []
    else:
        assert len(warned_lines) == 1 and "A.safetensors" in warned_lines[0] and warned in warned_lines[0]
    assert set(merged) == set(sd_a) | {POSITION_IDS}


def test_position_ids_of_sdxl_clip_l(tmp_path):
    from support.layouts import arch_overrides, key_shapes, random_state_dict

    shapes = key_shapes("sdxl", "tiny")
    sd_a, sd_b = random_state_dict(shapes, 0), random_state_dict(shapes, 1)
    key = quirks.SDXL_CLIP_L + "embeddings.position_ids"
    sd_b[key] = torch.arange(77).unsqueeze(0)
    a = quirks.save(tmp_path / "A.safetensors", sd_a, metadata=None)  # A lacks them
    b = quirks.save(tmp_path / "B.safetensors", sd_b, metadata=None)
    merged = average(a, b, tmp_path / "out.safetensors", shapes=shapes, arch=arch_overrides("sdxl", "tiny"))
    assert merged[key].dtype == torch.int64 and torch.equal(merged[key], torch.arange(77).unsqueeze(0))
    assert not any(k.endswith("position_ids") and k != key for k in merged)  # OpenCLIP-G has none


# --------------------------------------------------------------------------------------------
# 7. .ckpt containers


@pytest.mark.parametrize(
    "wrapping",
    [
        "plain",
        "state_dict",
        "state_dict.state_dict",
        "model",
        "module",
        "module_prefix",
        "state_dict.module_prefix",
    ],
)
def test_ckpt_containers_are_unwrapped(tmp_path, capsys, wrapping):
    tensors = quirks.fragment()
    path = quirks.save_ckpt(tmp_path / "m.ckpt", tensors, wrapping)
    ckpt = open_checkpoint(path)
    assert ckpt.kind == "pickle" and detect_family(ckpt) == "sd1-ldm"
    assert_same(dict(ckpt.iter_tensors(list(tensors))), tensors)
    rc, out, err = cli(capsys, "inspect", path, "--json")
    assert json.loads(out)["keys"] == len(tensors), err


@pytest.mark.parametrize(
    "content, found",
    [
        ({"optimizer": {"lr": 1e-4}, "epoch": 3}, "a dict with keys 'epoch', 'optimizer'"),
        ({"state_dict": {"state_dict": {"step": 1}}}, "a dict with keys 'state_dict'"),
        ([torch.zeros(2)], "a list"),
        ({}, "an empty dict"),
    ],
)
def test_ckpt_without_tensors_names_its_top_level(tmp_path, capsys, content, found):
    path = tmp_path / "odd.ckpt"
    torch.save(content, path)
    rc, _, err = cli(capsys, "inspect", path)
    one_line_error(rc, err, "odd.ckpt: holds no tensors", found)
