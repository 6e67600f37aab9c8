"""Checkpoints as users have them: quirky files open, merge with the right values, or fail in one line.

Each test builds its files with tests/support/quirks.py (tiny models of the real key layouts) and
asserts the values that come out: keys, dtypes, position ids, shapes and merged weights.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
from safetensors.torch import load_file
from support import quirks, tiny_merge
from support.quirks import INPUT_CONV, SD1_CLIP, UNET

from sd_mecha_rebasin.cli.commands import main
from sd_mecha_rebasin.cli.jobs import RunOptions, run
from sd_mecha_rebasin.common.errors import UserError
from sd_mecha_rebasin.files.checkpoint import detect_family, open_checkpoint

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
    run("average", a, b, out, RunOptions(threads=1, quiet=options.pop("quiet", True), **options))
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


# --------------------------------------------------------------------------------------------
# 2. fp8 weights: merged in fp32, written in --output-dtype


def _spec(config: str, arch, shapes):
    from sd_mecha_rebasin import permutation_spec

    return permutation_spec(config, arch=arch, shapes=shapes)


def _small_spec(shapes_changes: dict | None = None):
    from sd_mecha_rebasin.architectures.small import SMALL_ARCH, small_shapes

    shapes = {**small_shapes(), **(shapes_changes or {})}
    return _spec("sd1-ldm", SMALL_ARCH, shapes)


@pytest.mark.parametrize(
    "fp8_in, fp8, output_dtype",
    [
        ("A", torch.float8_e4m3fn, "fp16"),
        ("B", torch.float8_e5m2, "bf16"),
        ("AB", torch.float8_e4m3fn, "fp32"),
    ],
)
def test_fp8_weights_merge_with_fp32_arithmetic(tmp_path, fp8_in, fp8, output_dtype):
    from sd_mecha_rebasin.cli.jobs import DTYPES
    from sd_mecha_rebasin.permutations.spec import permute_tensor

    sd_a, sd_b = quirks.small_pair()
    if "A" in fp8_in:
        sd_a = quirks.cast_unet(sd_a, fp8)
    if "B" in fp8_in:
        sd_b = quirks.cast_unet(sd_b, fp8)
    a = quirks.save(tmp_path / "A.safetensors", sd_a)
    b = quirks.save(tmp_path / "B.safetensors", sd_b)
    result = run(
        "merge",
        a,
        b,
        tmp_path / "out.safetensors",
        RunOptions(threads=1, iters=3, quiet=True, output_dtype=output_dtype),
    )
    merged = load_file(str(tmp_path / "out.safetensors"))
    dtype = DTYPES[output_dtype]
    spec = _small_spec()
    assert result.permutations_changed > 100  # B is a permuted A: matching worked on fp8 values
    for key in (
        NEVER_PERMUTED,
        UNET + "input_blocks.1.0.in_layers.2.weight",
        UNET + "middle_block.1.proj_in.weight",
    ):
        assert merged[key].dtype == dtype, key
        aligned_b = permute_tensor(spec, key, sd_b[key].float(), result.perms)
        expected = torch.lerp(sd_a[key].float(), aligned_b, 0.5).to(dtype)  # fp32 arithmetic, then cast
        assert torch.equal(merged[key], expected), key
    unet_dtypes = {merged[k].dtype for k in merged if k.startswith(UNET)}
    assert unet_dtypes == {dtype}
    assert merged[POSITION_IDS].dtype == torch.int64


def test_fp8_nan_is_named(tmp_path, capsys):
    sd_a, sd_b = quirks.small_pair()
    sd_b = quirks.cast_unet(sd_b, torch.float8_e4m3fn)
    key = UNET + "out.2.weight"
    bad = sd_b[key].float()
    bad.view(-1)[3] = float("nan")
    sd_b[key] = bad.to(torch.float8_e4m3fn)
    a = quirks.save(tmp_path / "A.safetensors", sd_a)
    b = quirks.save(tmp_path / "B.safetensors", sd_b)
    rc, _, err = cli(capsys, "merge", a, b, "-o", tmp_path / "m.safetensors")
    one_line_error(rc, err, "B.safetensors", key, "NaN")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.safetensors", "B.safetensors"]


# --------------------------------------------------------------------------------------------
# 3. Inpainting (9 input channels) and instruct-pix2pix (8) models


def _variant_pair(channels_a: int, channels_b: int, tmp_path: pathlib.Path):
    sd_a, sd_b = quirks.small_pair()
    if channels_a != 4:
        sd_a = quirks.with_input_channels(sd_a, channels_a, seed=0)
    if channels_b != 4:
        sd_b = quirks.with_input_channels(sd_b, channels_b, seed=1)
    a = quirks.save(tmp_path / f"A{channels_a}.safetensors", sd_a)
    b = quirks.save(tmp_path / f"B{channels_b}.safetensors", sd_b)
    return a, b, sd_a, sd_b


@pytest.mark.parametrize("channels_a, channels_b", [(9, 9), (8, 8), (9, 4)])
def test_variant_merges_keep_the_extra_channels_of_a(tmp_path, channels_a, channels_b):
    from sd_mecha_rebasin.permutations.spec import permute_tensor

    a, b, sd_a, sd_b = _variant_pair(channels_a, channels_b, tmp_path)
    alpha = 0.3
    result = run(
        "merge", a, b, tmp_path / "out.safetensors",
        RunOptions(threads=1, iters=3, quiet=True, output_dtype="fp32"), alpha=alpha,
    )  # fmt: skip
    merged = load_file(str(tmp_path / "out.safetensors"))
    conv_a, conv_b = sd_a[INPUT_CONV], sd_b[INPUT_CONV]
    assert merged[INPUT_CONV].shape == conv_a.shape and merged[INPUT_CONV].dtype == torch.float32
    spec = _small_spec({INPUT_CONV: tuple(conv_b.shape)})
    aligned_b = permute_tensor(spec, INPUT_CONV, conv_b, result.perms)  # rows (output channels) only
    n = conv_b.shape[1]  # the channels both have are merged ...
    assert torch.equal(merged[INPUT_CONV][:, :n], torch.lerp(conv_a[:, :n], aligned_b, alpha))
    assert torch.equal(merged[INPUT_CONV][:, n:], conv_a[:, n:])  # ... A's extra channels kept exactly
    assert (merged[INPUT_CONV][:, :4] - conv_a[:, :4]).norm() < 0.05 * conv_a[:, :4].norm()  # B was aligned
    assert result.permutations_changed > 100


def test_variant_merge_through_the_cli_and_inspect(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    a, b, sd_a, _ = _variant_pair(9, 4, tmp_path)
    rc, _, err = cli(capsys, "merge", a, b, "--threads", "2", "--iters", "2", "-q")
    assert rc == 0, err
    merged = load_file("merged.safetensors")
    assert merged[INPUT_CONV].dtype == torch.float16 and merged[INPUT_CONV].shape == (32, 9, 3, 3)
    assert torch.equal(merged[INPUT_CONV][:, 4:], sd_a[INPUT_CONV][:, 4:].half())
    rc, out, err = cli(capsys, "inspect", a)
    assert rc == 0 and "variant:     inpainting (9 UNet input channels)" in out, err
    rc, out, _ = cli(capsys, "inspect", "merged.safetensors", "--json")
    info = json.loads(out)
    assert (info["variant"], info["input_channels"], info["problem"]) == ("inpainting", 9, None)


@pytest.mark.parametrize(
    "channels_a, channels_b, needles",
    [
        (4, 9, ("B9.safetensors: is an inpainting model", "put the inpainting model first")),
        (4, 8, ("B8.safetensors: is an instruct-pix2pix model", "put the instruct-pix2pix model first")),
        (9, 8, ("B8.safetensors: is an instruct-pix2pix model", "A9.safetensors is an inpainting model")),
    ],
)
def test_variant_pairs_that_cannot_merge(tmp_path, capsys, channels_a, channels_b, needles):
    a, b, _, _ = _variant_pair(channels_a, channels_b, tmp_path)
    rc, _, err = cli(capsys, "merge", a, b, "-o", tmp_path / "m.safetensors")
    one_line_error(rc, err, *needles)
    assert not (tmp_path / "m.safetensors").exists()


def test_align_accepts_a_plain_reference_for_an_inpainting_model(tmp_path):
    from sd_mecha_rebasin.permutations.spec import permute_tensor

    a, b, _, sd_b = _variant_pair(4, 9, tmp_path)
    result = run(
        "align",
        a,
        b,
        tmp_path / "out.safetensors",
        RunOptions(threads=1, iters=3, quiet=True, output_dtype="fp32"),
    )
    aligned = load_file(str(tmp_path / "out.safetensors"))
    spec = _small_spec({INPUT_CONV: (32, 9, 3, 3)})
    assert aligned[INPUT_CONV].shape == (32, 9, 3, 3)
    assert torch.equal(aligned[INPUT_CONV], permute_tensor(spec, INPUT_CONV, sd_b[INPUT_CONV], result.perms))
    assert result.permutations_changed > 100


def test_full_size_variant_layouts_pass_validation(tmp_path, capsys):
    """Real SD1 shapes (sparse files, no data read): plain + inpainting is refused the right way
    round, two inpainting models pass validation, inspect names the variant."""
    from sd_mecha_rebasin.cli.jobs import load_inputs

    layout = {k: v for k, v in _config_shapes("sd1-ldm").items()}
    plain = _sparse(tmp_path / "sd15.safetensors", layout)
    inpaint = _sparse(tmp_path / "inpaint.safetensors", {**layout, INPUT_CONV: (320, 9, 3, 3)})
    inpaint2 = _sparse(tmp_path / "inpaint2.safetensors", {**layout, INPUT_CONV: (320, 9, 3, 3)})
    rc, _, err = cli(capsys, "merge", plain, inpaint, "-o", tmp_path / "m.safetensors")
    one_line_error(rc, err, "inpaint.safetensors: is an inpainting model", "put the inpainting model first")
    a, b, _ = load_inputs(inpaint, inpaint2, RunOptions())
    assert a.shapes[INPUT_CONV] == b.shapes[INPUT_CONV] == (320, 9, 3, 3)
    load_inputs(inpaint, plain, RunOptions())  # the inpainting model as A
    rc, out, err = cli(capsys, "inspect", inpaint)
    assert rc == 0 and "variant:     inpainting (9 UNet input channels)" in out, out + err
    odd = _sparse(tmp_path / "odd.safetensors", {**layout, INPUT_CONV: (320, 5, 3, 3)})
    rc, _, err = cli(capsys, "merge", odd, plain, "-o", tmp_path / "m.safetensors")
    one_line_error(rc, err, "odd.safetensors", "[320, 5, 3, 3]", "expects [320, 4, 3, 3]")


def _config_shapes(config: str) -> dict[str, tuple[int, ...]]:
    from sd_mecha.extensions import model_configs

    import sd_mecha_rebasin  # noqa: F401

    components = model_configs.resolve(config).components()
    return {
        k: tuple(m.shape)
        for name in ("clip_l", "diffuser")
        for k, m in components[name].keys().items()
        if m.dtype.is_floating_point
    }


def _sparse(path: pathlib.Path, layout: dict[str, tuple[int, ...]]) -> pathlib.Path:
    """A safetensors file with the header of `layout` (fp16) over a sparse all-zero data section."""
    header, offset = {}, 0
    for key, shape in layout.items():
        n = 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return path


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_same_kind_inpainting_pairs_of_sd2_and_sdxl(tmp_path, family):
    from support.layouts import arch_overrides, key_shapes, random_state_dict

    from sd_mecha_rebasin.permutations.spec import permute_tensor

    config = {"sd2": "sd2-ldm", "sdxl": "sdxl-sgm"}[family]
    shapes = key_shapes(family, "tiny")
    arch = arch_overrides(family, "tiny")
    sd_a = quirks.with_input_channels(random_state_dict(shapes, 0), 9, seed=0)
    sd_b = quirks.with_input_channels(random_state_dict(shapes, 1), 9, seed=1)
    a = quirks.save(tmp_path / "A.safetensors", sd_a, metadata=None)
    b = quirks.save(tmp_path / "B.safetensors", sd_b, metadata=None)
    result = run(
        "merge", a, b, tmp_path / "out.safetensors",
        RunOptions(threads=1, iters=2, quiet=True, output_dtype="fp32", shapes=shapes, arch=arch),
    )  # fmt: skip
    assert result.config == config
    merged = load_file(str(tmp_path / "out.safetensors"))
    spec = _spec(config, arch, {**shapes, INPUT_CONV: tuple(sd_b[INPUT_CONV].shape)})
    aligned_b = permute_tensor(spec, INPUT_CONV, sd_b[INPUT_CONV], result.perms)
    assert merged[INPUT_CONV].shape == sd_a[INPUT_CONV].shape
    assert torch.equal(merged[INPUT_CONV], torch.lerp(sd_a[INPUT_CONV], aligned_b, 0.5))


def test_python_recipe_merges_a_same_kind_inpainting_pair(tmp_path):
    """`sd_mecha.weighted_sum(a, git_rebasin(b, a))` on two inpainting files, no CLI involved."""
    import sd_mecha

    import sd_mecha_rebasin
    from sd_mecha_rebasin.architectures.small import SMALL_ARCH
    from sd_mecha_rebasin.mecha.merge_method import arch_override

    a, b, sd_a, sd_b = _variant_pair(9, 9, tmp_path)
    ma, mb = sd_mecha.model(str(a), "sd1-ldm"), sd_mecha.model(str(b), "sd1-ldm")
    recipe = sd_mecha.weighted_sum(ma, sd_mecha_rebasin.rebasin(mb, ma, iters=3, threads=1), alpha=0.5)
    with arch_override("sd1-ldm", SMALL_ARCH):
        merged = tiny_merge.merge(
            recipe, output_dtype=torch.float32, threads=1, tqdm=_no_bar, check_extra_keys=False
        )
    conv, conv_a, conv_b = merged[INPUT_CONV], sd_a[INPUT_CONV], sd_b[INPUT_CONV]
    assert conv.shape == (32, 9, 3, 3)
    assert (conv[:, :4] - conv_a[:, :4]).norm() < 0.05 * conv_a[:, :4].norm()  # B was aligned to A
    # which row of B each merged row took (from the latent channels), then the extra channels of
    # that same row: the whole convolution was permuted as one, extra channels included
    rows_b = 2 * conv[:, :4] - conv_a[:, :4]
    source = torch.cdist(rows_b.flatten(1), conv_b[:, :4].flatten(1)).argmin(dim=1)
    assert sorted(source.tolist()) == list(range(32)) and source.tolist() != list(range(32))
    assert torch.allclose(conv[:, 4:], torch.lerp(conv_a[:, 4:], conv_b[source, 4:], 0.5), atol=1e-6)


def _no_bar(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, **kwargs, disable=True)


# --------------------------------------------------------------------------------------------
# Every error from reading a file is named for what it is (never "internal error")


def test_upper_case_suffix_complex_pickles_and_uint8(tmp_path, capsys):
    sd_a, sd_b = quirks.small_pair()
    a = quirks.save(tmp_path / "A.safetensors", sd_a)
    upper = quirks.save(tmp_path / "UP.SAFETENSORS", sd_b)
    rc, _, err = cli(capsys, "merge", a, upper, "-o", tmp_path / "m.safetensors")
    one_line_error(
        rc, err, "UP.SAFETENSORS: sd-mecha reads only lower-case .safetensors files", "UP.safetensors"
    )
    odd = quirks.save_ckpt(
        tmp_path / "C.ckpt", {**sd_b, NEVER_PERMUTED: sd_b[NEVER_PERMUTED].to(torch.complex64)}, "state_dict"
    )
    rc, _, err = cli(capsys, "merge", a, odd, "-o", tmp_path / "m.safetensors")
    one_line_error(rc, err, f"C.ckpt: {NEVER_PERMUTED} has dtype complex64")
    sparse = quirks.save_ckpt(
        tmp_path / "S.ckpt", {**sd_b, NEVER_PERMUTED: sd_b[NEVER_PERMUTED].to_sparse()}, "plain"
    )
    rc, _, err = cli(capsys, "merge", a, sparse, "-o", tmp_path / "m.safetensors")
    one_line_error(rc, err, f"S.ckpt: {NEVER_PERMUTED} is a sparse_coo tensor, not a dense one")
    # uint8: kept as it is under a key sd-mecha does not know, refused where sd-mecha would read it
    u8 = quirks.save(
        tmp_path / "U8.safetensors", {**sd_a, "my_tool.mask": torch.arange(3, dtype=torch.uint8)}
    )
    merged = average(u8, a, tmp_path / "out.safetensors")
    assert merged["my_tool.mask"].dtype == torch.uint8 and torch.equal(
        merged["my_tool.mask"], torch.arange(3, dtype=torch.uint8)
    )
    bad = quirks.save(
        tmp_path / "U8w.safetensors", {**sd_a, NEVER_PERMUTED: torch.zeros(4, dtype=torch.uint8)}
    )
    rc, _, err = cli(capsys, "merge", bad, a, "-o", tmp_path / "m.safetensors")
    one_line_error(rc, err, f"U8w.safetensors: {NEVER_PERMUTED} has dtype uint8")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_read_error_during_the_merge_is_named(tmp_path, monkeypatch, capsys):
    import sd_mecha

    sd_a, sd_b = quirks.small_pair()
    a = quirks.save(tmp_path / "A.safetensors", sd_a)
    b = quirks.save(tmp_path / "B.safetensors", sd_b)

    def vanished(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(b))

    monkeypatch.setattr(sd_mecha, "merge", vanished)
    rc, _, err = cli(capsys, "merge", a, b, "-o", tmp_path / "m.safetensors")
    one_line_error(rc, err, f"{b}: cannot read it: No such file or directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.safetensors", "B.safetensors"]


def test_python_recipe_merges_an_inpainting_a_with_a_plain_b(tmp_path):
    """The README's recipe: `fill_input_channels` before the weighted sum, A's extra channels kept."""
    import sd_mecha

    import sd_mecha_rebasin
    from sd_mecha_rebasin.architectures.small import SMALL_ARCH
    from sd_mecha_rebasin.mecha.merge_method import arch_override

    a, b, sd_a, sd_b = _variant_pair(9, 4, tmp_path)
    ma, mb = sd_mecha.model(str(a), "sd1-ldm"), sd_mecha.model(str(b), "sd1-ldm")
    aligned = sd_mecha_rebasin.rebasin(mb, ma, iters=3, threads=1)
    recipe = sd_mecha.weighted_sum(ma, sd_mecha_rebasin.fill_input_channels(aligned, ma), alpha=0.5)
    with arch_override("sd1-ldm", SMALL_ARCH):
        tiny_merge.merge(
            recipe, output=tmp_path / "out.safetensors", output_dtype=torch.float32, threads=1, tqdm=_no_bar
        )
    conv, conv_a = load_file(str(tmp_path / "out.safetensors"))[INPUT_CONV], sd_a[INPUT_CONV]
    assert conv.shape == (32, 9, 3, 3) and torch.equal(conv[:, 4:], conv_a[:, 4:])
    assert (conv[:, :4] - conv_a[:, :4]).norm() < 0.05 * conv_a[:, :4].norm()  # B aligned, then merged


@pytest.mark.parametrize("field", ["sd_merge_recipe", "sd_merge_models"])
def test_deeply_nested_metadata_of_an_input(tmp_path, field):
    """An earlier tool's recipe nested past Python's recursion limit is carried as text or dropped,
    never an error: the merge writes its own metadata."""
    import json

    sd_a, sd_b = quirks.small_pair()
    deep = "[" * 100_000 + "]" * 100_000
    a = quirks.save(tmp_path / "A.safetensors", sd_a, metadata={**quirks.DEMO_META, field: deep})
    b = quirks.save(tmp_path / "B.safetensors", sd_b)
    out = tmp_path / "out.safetensors"
    average(a, b, out, metadata=True)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    models = json.loads(meta["sd_merge_models"])
    assert json.loads(meta["sd_merge_recipe"])["type"] == "sd-mecha-rebasin"
    records = [r for r in models.values() if r.get("name") == "A.safetensors"]
    assert len(records) == 1
    if field == "sd_merge_recipe":
        assert records[0]["sd_merge_recipe"] == deep  # kept as the text it was
