"""Quantized downloads: fp8 scaled safetensors and GGUF read dequantized; other formats refused in one line.

fp8 scaled files are built the way ComfyUI's converters write them (codes = weight / scale rounded
to fp8, one float32 scale per layer, in the legacy `scale_weight` names or the newer
`weight_scale` + `comfy_quant` / `_quantization_metadata` names); GGUF files with `gguf.GGUFWriter`,
quantized with `gguf.quants.quantize` (Q8_0) or as raw Q4_K blocks, flattened like ComfyUI-GGUF's
convert script with `comfy.gguf.orig_shape.*`. Every test asserts the values that come out.
"""

from __future__ import annotations

import json
import pathlib

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support import quirks, tiny_merge
from support.quirks import DEMO_META, UNET
from support.unet_only import small_models, unet_of, write_unet_gguf

from sd_mecha_rebasin.architectures import permutation_spec
from sd_mecha_rebasin.architectures.small import SMALL_ARCH, small_shapes
from sd_mecha_rebasin.cli.commands import main
from sd_mecha_rebasin.cli.jobs import RunOptions, run
from sd_mecha_rebasin.common.errors import UserError
from sd_mecha_rebasin.files.checkpoint import detect_family, open_checkpoint
from sd_mecha_rebasin.permutations.spec import apply_permutation, invert

FP8 = torch.float8_e4m3fn
CONVENTIONS = ("legacy", "comfy_quant", "metadata")


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


def _quantized_keys(sd: dict[str, torch.Tensor]) -> list[str]:
    """The weights a converter stores in fp8: every matrix and convolution of the UNet and text encoder."""
    return [k for k, v in sd.items() if k.endswith(".weight") and v.dim() >= 2 and "embedding" not in k]


def scaled_file(
    path: pathlib.Path,
    dequantized: dict[str, torch.Tensor],
    codes: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    convention: str,
) -> pathlib.Path:
    """Write an fp8 scaled file: `codes[k]` (fp8) with `scales[k]` (float32) for the quantized keys,
    every other key of `dequantized` as it is; returns the path."""
    out: dict[str, torch.Tensor] = {}
    metadata = dict(DEMO_META)
    layers = {}
    for key, value in dequantized.items():
        if key not in codes:
            out[key] = value
            continue
        module = key.removesuffix(".weight")
        out[key] = codes[key]
        if convention == "legacy":
            out[module + ".scale_weight"] = scales[key]
            out[module + ".scale_input"] = torch.ones((), dtype=torch.float32)
        else:
            out[module + ".weight_scale"] = scales[key]
            out[module + ".input_scale"] = torch.full((), 0.5)
            conf = {"format": "float8_e4m3fn"}
            if convention == "comfy_quant":
                out[module + ".comfy_quant"] = torch.tensor(
                    list(json.dumps(conf).encode()), dtype=torch.uint8
                )
            layers[module] = conf
    if convention == "legacy":
        out[UNET + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    if convention == "metadata":
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return quirks.save(path, out, metadata)


def quantize(sd: dict[str, torch.Tensor], headroom: float = 448.0, factor: float = 1.0):
    """fp8 codes and float32 scales of the quantized keys (scale = factor * max|W| / headroom), and
    the exact dequantized model (codes * scale in float32; other keys as they are)."""
    codes, scales, dequantized = {}, {}, dict(sd)
    for key in _quantized_keys(sd):
        w = sd[key].float()
        scale = torch.tensor(factor * float(w.abs().max()) / headroom, dtype=torch.float32)
        codes[key] = (w / scale).to(FP8)
        scales[key] = scale.reshape(1)
        dequantized[key] = codes[key].float() * scale
    return codes, scales, dequantized


def _output_keys_are_plain(merged: dict[str, torch.Tensor], quantized_keys: list[str]) -> None:
    suffixes = (
        ".scale_weight",
        ".weight_scale",
        ".scale_input",
        ".input_scale",
        ".comfy_quant",
        "scaled_fp8",
    )
    assert not [k for k in merged if k.endswith(suffixes)]
    assert {merged[k].dtype for k in quantized_keys} == {torch.float32}


# --------------------------------------------------------------------------------------------
# fp8 scaled: two files with different scales merge to the mean of the dequantized weights


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_scaled_pair_averages_dequantized_weights_not_codes(tmp_path, convention):
    sd_a, sd_b = quirks.small_pair()
    codes_a, scales_a, deq_a = quantize(sd_a, factor=1.0)
    codes_b, scales_b, deq_b = quantize(sd_b, factor=7.3)  # other scales: the codes mean nothing alone
    a = scaled_file(tmp_path / "A.safetensors", deq_a, codes_a, scales_a, convention)
    b = scaled_file(tmp_path / "B.safetensors", deq_b, codes_b, scales_b, convention)
    out = tmp_path / "out.safetensors"
    run("average", a, b, out, RunOptions(threads=1, quiet=True, output_dtype="fp32"))
    merged = load_file(str(out))
    keys = list(codes_a)
    assert len(keys) > 100
    _output_keys_are_plain(merged, keys)
    assert set(merged) == set(sd_a)  # every key of A, no scale key added
    for key in keys:
        expected = torch.lerp(deq_a[key], deq_b[key], 0.5)
        torch.testing.assert_close(merged[key], expected, rtol=1e-6, atol=1e-9)
    # the merge of codes (each file's codes averaged, read with A's scale) is far from it
    key = UNET + "middle_block.1.proj_in.weight"
    codes_mean = (codes_a[key].float() + codes_b[key].float()) / 2 * scales_a[key]
    truth = torch.lerp(deq_a[key], deq_b[key], 0.5)
    assert (codes_mean - truth).norm() > 0.5 * truth.norm()
    with open(out, "rb") as f:  # the output's metadata does not carry the input's quantization
        assert b"_quantization_metadata" not in f.read(int.from_bytes(f.read(8), "little"))


@pytest.mark.parametrize("command", ["merge", "merge-many"])
def test_rebasin_recovers_a_permutation_stored_with_other_scales(tmp_path, capsys, command):
    """B = a legal permutation of A, stored with codes twice A's and half A's scales (the same
    dequantized values, exactly): re-basin undoes the permutation and the merge is A itself, through
    the pair merge and through MergeMany (which reads the files lazily, key by key)."""
    from sd_mecha_rebasin import permutation_spec
    from sd_mecha_rebasin.architectures.small import SMALL_ARCH, small_shapes
    from sd_mecha_rebasin.permutations.spec import apply_permutation, random_permutation

    sd_a, _ = quirks.small_pair()
    codes_a, scales_a, deq_a = quantize(sd_a, headroom=224.0)  # |codes| <= 224: doubling them is exact
    spec = permutation_spec("sd1-ldm", arch=SMALL_ARCH, shapes=small_shapes())
    perms = random_permutation(spec, seed=5)
    deq_b = apply_permutation(spec, perms, deq_a)
    permuted_codes = apply_permutation(spec, perms, {k: c.float() for k, c in codes_a.items()})
    codes_b = {k: (2 * c).to(FP8) for k, c in permuted_codes.items()}
    scales_b = {k: s / 2 for k, s in scales_a.items()}
    for key in codes_b:  # B's file holds exactly the permuted A
        assert torch.equal(codes_b[key].float() * scales_b[key], deq_b[key]), key
    a = scaled_file(tmp_path / "A.safetensors", deq_a, codes_a, scales_a, "comfy_quant")
    b = scaled_file(tmp_path / "B.safetensors", deq_b, codes_b, scales_b, "legacy")
    out = tmp_path / "out.safetensors"
    opts = RunOptions(threads=1, iters=3, quiet=True, output_dtype="fp32")
    if command == "merge":
        result = run("merge", a, b, out, opts)
        assert result.permutations_changed > 100
    else:
        from sd_mecha_rebasin.cli.many_job import merge_many_files

        merge_many_files([a, b, a], out, options=opts)
        rc, text, _ = cli(capsys, "inspect", "--json", b)
        info = json.loads(text)
        assert rc == 0 and info["quantization"].startswith("fp8 scaled (legacy scaled fp8)"), info
        assert (
            not [d for d in info["dtypes"] if "float8" in d] and not info["problem"]
        )  # codes never shown raw
    merged = load_file(str(out))
    _output_keys_are_plain(merged, list(codes_a))
    exact = command == "merge"  # (a + a) / 2 is a; MergeMany's weighted mean of three rounds once or twice
    for key in codes_a:
        torch.testing.assert_close(
            merged[key], deq_a[key], rtol=0 if exact else 3e-7, atol=0 if exact else 1e-12
        )


def test_sd_mecha_recipe_reads_scaled_files_dequantized(tmp_path):
    import sd_mecha

    import sd_mecha_rebasin  # noqa: F401  (wraps sd-mecha's safetensors reader)

    sd_a, sd_b = quirks.small_pair()
    codes_a, scales_a, deq_a = quantize(sd_a)
    codes_b, scales_b, deq_b = quantize(sd_b, factor=3.0)
    a = scaled_file(tmp_path / "A.safetensors", deq_a, codes_a, scales_a, "metadata")
    b = scaled_file(tmp_path / "B.safetensors", deq_b, codes_b, scales_b, "legacy")
    recipe = sd_mecha.weighted_sum(
        sd_mecha.model(str(a), "sd1-ldm"), sd_mecha.model(str(b), "sd1-ldm"), alpha=0.5
    )
    merged = tiny_merge.merge(
        recipe, output_dtype=torch.float32, threads=1, tqdm=_no_bar, check_extra_keys=False
    )
    assert not [
        k for k in merged if k.endswith((".scale_weight", ".weight_scale", ".comfy_quant", "scaled_fp8"))
    ]
    for key in codes_a:
        torch.testing.assert_close(merged[key], torch.lerp(deq_a[key], deq_b[key], 0.5), rtol=1e-6, atol=1e-9)


def _no_bar(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


def test_scaled_reading_per_row_scale_e5m2_and_inspect(tmp_path, capsys):
    tensors = quirks.fragment()
    key = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    w = tensors[key].float()
    row_scale = (w.abs().amax(dim=1, keepdim=True) / 57344.0).float()  # one scale per output row
    codes = (w / row_scale).to(torch.float8_e5m2)
    conv = quirks.INPUT_CONV
    conv_codes = (tensors[conv].float() / 0.01).to(FP8)
    conf = torch.tensor(list(json.dumps({"format": "float8_e5m2"}).encode()), dtype=torch.uint8)
    layer = key.removesuffix(".weight")
    stored = {
        **tensors,
        key: codes,
        layer + ".weight_scale": row_scale,
        layer + ".comfy_quant": conf,
        conv: conv_codes,
        conv.removesuffix(".weight") + ".scale_weight": torch.tensor(0.01),
    }
    path = quirks.save(tmp_path / "f.safetensors", stored)
    ckpt = open_checkpoint(path)
    assert set(ckpt.shapes) == set(tensors)
    assert ckpt.dtypes[key] == torch.float32 and ckpt.dtypes[conv] == torch.float32
    values = dict(ckpt.iter_tensors(list(ckpt.shapes)))
    assert torch.equal(values[key], codes.float() * row_scale)
    assert torch.equal(values[conv], conv_codes.float() * torch.tensor(0.01))
    assert torch.equal(values[UNET + "input_blocks.0.0.bias"], tensors[UNET + "input_blocks.0.0.bias"])
    assert "fp8 scaled" in ckpt.quantized.format and "2 scaled layers" in ckpt.quantized.format
    both = quirks.save(tmp_path / "both.safetensors", {**stored, layer + ".scale_weight": row_scale})
    with pytest.raises(UserError, match="two scales for " + key.replace(".", r"\.")):
        open_checkpoint(both)


# --------------------------------------------------------------------------------------------
# Refused in one line naming the file and the format, nothing written


def _refusal_pair(
    tmp_path: pathlib.Path, extra: dict[str, torch.Tensor], metadata=None
) -> tuple[pathlib.Path, pathlib.Path]:
    sd_a, sd_b = quirks.small_pair()
    a = quirks.save(tmp_path / "A.safetensors", sd_a)
    b = quirks.save(tmp_path / "B.safetensors", {**sd_b, **extra}, metadata or DEMO_META)
    return a, b


LAYER = UNET + "middle_block.1.proj_in"
U8 = torch.zeros(8, dtype=torch.uint8)


@pytest.mark.parametrize(
    "extra, metadata, needle",
    [
        (
            {
                LAYER + ".weight.absmax": torch.ones(2),
                LAYER + ".weight.quant_map": torch.ones(16),
                LAYER + ".weight.quant_state.bitsandbytes__nf4": U8,
            },
            None,
            "bitsandbytes NF4",
        ),
        (
            {LAYER + ".weight.absmax": torch.ones(2), LAYER + ".weight.quant_state.bitsandbytes__fp4": U8},
            None,
            "bitsandbytes FP4",
        ),
        ({LAYER + ".weight.absmax": torch.ones(2)}, None, "bitsandbytes 4-bit"),
        ({LAYER + ".weight_scale": torch.ones(1), LAYER + ".weight_scale_2": torch.ones(1)}, None, "NVFP4"),
        (
            {LAYER + ".weight_scale": torch.ones(1)},
            {**DEMO_META, "_quantization_metadata": json.dumps({"layers": {LAYER: {"format": "mxfp8"}}})},
            "'mxfp8'",
        ),
        ({LAYER + ".weight_scale": torch.ones(4, 2)}, None, "block-wise"),
    ],
)
def test_unreadable_quantizations_are_refused_in_one_line(tmp_path, capsys, extra, metadata, needle):
    a, b = _refusal_pair(tmp_path, extra, metadata)
    rc, _, err = cli(capsys, "merge", a, b, "-o", tmp_path / "m.safetensors")
    line = one_line_error(rc, err, "B.safetensors", needle)
    assert "dequantized exactly" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.safetensors", "B.safetensors"]


def test_scaled_pickle_and_sd_mecha_refuse(tmp_path, capsys):
    import sd_mecha

    sd_a, _ = quirks.small_pair()
    ckpt = quirks.save_ckpt(tmp_path / "q.ckpt", {**sd_a, LAYER + ".scale_weight": torch.ones(())}, "plain")
    rc, _, err = cli(capsys, "inspect", ckpt)
    one_line_error(rc, err, "q.ckpt", "fp8 scales", ".safetensors")
    _, b = _refusal_pair(
        tmp_path,
        {LAYER + ".weight.absmax": torch.ones(2), LAYER + ".weight.quant_state.bitsandbytes__nf4": U8},
    )
    with pytest.raises(UserError, match="bitsandbytes NF4"):  # sd-mecha's own reading refuses it too
        tiny_merge.merge(
            sd_mecha.model(str(b), "sd1-ldm"),
            output_dtype=torch.float32,
            threads=1,
            tqdm=_no_bar,
            check_extra_keys=False,
        )


# --------------------------------------------------------------------------------------------
# GGUF: read through the gguf package, dequantized, original shapes, the file's key names

Q = gguf.GGMLQuantizationType


def _q4_k_blocks(n_blocks: int, seed: int) -> np.ndarray:
    """Raw Q4_K blocks (144 bytes each: fp16 d, fp16 dmin, 12 bytes of 6-bit scales, 128 of nibbles),
    random bytes with finite d and dmin (the gguf package has no Q4_K quantizer)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, 144), dtype=np.uint8)
    raw[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    raw[:, 2:4] = np.frombuffer(np.float16(0.004).tobytes(), dtype=np.uint8)
    return raw


def _q8_0_decode(raw: np.ndarray) -> np.ndarray:
    """Q8_0 decoded independently (34-byte blocks: fp16 d, then 32 int8 q; value = d * q)."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(-1)


def write_gguf(path: pathlib.Path, arch: str = "sdxl", seed: int = 0) -> dict[str, torch.Tensor]:
    """A UNet GGUF as ComfyUI-GGUF writes it; returns the values a reader must produce (original shapes)."""
    gen = torch.Generator().manual_seed(seed)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    expected: dict[str, torch.Tensor] = {}

    conv = "input_blocks.0.0.weight"  # [64, 4, 3, 3]: 2304 values, flattened to rows of 256, Q8_0
    w = torch.randn(64, 4, 3, 3, generator=gen)
    raw = gguf.quants.quantize(w.numpy().reshape(-1, 256), Q.Q8_0)
    writer.add_array("comfy.gguf.orig_shape." + conv, [64, 4, 3, 3])
    writer.add_tensor(conv, raw, raw_dtype=Q.Q8_0)
    expected[conv] = torch.from_numpy(_q8_0_decode(raw)).reshape(64, 4, 3, 3)

    res = "output_blocks.0.0.in_layers.2.weight"  # [16, 32, 3, 3] flattened, Q4_K
    raw = _q4_k_blocks(4608 // 256, seed)
    writer.add_array("comfy.gguf.orig_shape." + res, [16, 32, 3, 3])
    writer.add_tensor(res, raw, raw_dtype=Q.Q4_K)
    expected[res] = torch.from_numpy(gguf.quants.dequantize(raw, Q.Q4_K).copy()).reshape(16, 32, 3, 3)

    lin = "middle_block.1.proj_in.weight"  # [64, 512], Q8_0 in its own shape (rows of 512)
    w = torch.randn(64, 512, generator=gen)
    raw = gguf.quants.quantize(w.numpy(), Q.Q8_0)
    writer.add_tensor(lin, raw, raw_dtype=Q.Q8_0)
    expected[lin] = torch.from_numpy(_q8_0_decode(raw)).reshape(64, 512)

    half = "time_embed.0.weight"  # F16, as it is
    expected[half] = torch.randn(32, 48, generator=gen).half()
    writer.add_tensor(half, expected[half].numpy())
    bias = "time_embed.0.bias"  # F32 (1-D tensors stay float32 in convert.py)
    expected[bias] = torch.randn(32, generator=gen)
    writer.add_tensor(bias, expected[bias].numpy())
    bf = "out.2.weight"  # BF16
    expected[bf] = torch.randn(4, 320, generator=gen).to(torch.bfloat16)
    writer.add_tensor(bf, gguf.quants.quantize(expected[bf].float().numpy(), Q.BF16), raw_dtype=Q.BF16)

    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_gguf_reads_dequantized_in_original_shapes(tmp_path):
    path = tmp_path / "unet-Q8_0.gguf"
    expected = write_gguf(path)
    ckpt = open_checkpoint(path)
    assert ckpt.kind == "gguf"
    assert ckpt.shapes == {
        k: tuple(v.shape) for k, v in expected.items()
    }  # the file's names, original shapes
    values = dict(ckpt.iter_tensors(list(ckpt.shapes)))
    for key, value in expected.items():
        assert values[key].dtype == (value.dtype if value.dtype != torch.float32 else torch.float32), key
        assert ckpt.dtypes[key] == values[key].dtype, key
        assert torch.equal(values[key], value), key
    assert "Q4_K 1" in ckpt.quantized.format and "Q8_0 2" in ckpt.quantized.format
    values[next(iter(values))].add_(1)  # tensors of its own memory (the file is mapped read-only)

    from sd_mecha.extensions import model_formats

    import sd_mecha_rebasin  # noqa: F401  (registers the .gguf format with sd-mecha)

    (fmt,) = [f for f in model_formats.get_all() if f.matches(path)]
    reader = fmt.get_read_dict(path, 1 << 20)
    assert dict(reader.metadata()).keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(reader[key], value), key


def test_gguf_pair_and_other_ggufs_are_one_line(tmp_path, capsys):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_gguf(a, seed=0)  # a few UNet tensors, no cross-attention: not a whole UNet
    write_gguf(b, seed=1)
    out = tmp_path / "m.safetensors"
    rc, _, err = cli(capsys, "merge", a, b, "-o", out)
    one_line_error(rc, err, "a.gguf", "UNet-only", "cross-attention")
    assert not out.exists()

    flux = tmp_path / "flux.gguf"
    write_gguf(flux, arch="flux")
    rc, _, err = cli(capsys, "inspect", flux)
    one_line_error(rc, err, "flux.gguf", "GGUF", "'flux'")

    renamed = tmp_path / "unet.safetensors"
    renamed.write_bytes(a.read_bytes())
    rc, _, err = cli(capsys, "inspect", renamed)
    one_line_error(rc, err, "unet.safetensors", "GGUF", "rename it to .gguf")

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(a.read_bytes()[:200])
    rc, _, err = cli(capsys, "inspect", broken)
    one_line_error(rc, err, "broken.gguf", "GGUF")


def test_gguf_pair_merges_to_safetensors_in_bare_layout(tmp_path):
    """Two GGUF UNets (Q8_0 matrices) merge: detected as UNet-only, read dequantized, re-based, and
    written as safetensors in the GGUF's own (bare LDM) names; the values are the mean in A's basis."""
    full, b_unet, hidden = small_models()
    a, b, out = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "m.safetensors"
    a_values = write_unet_gguf(a, unet_of(full))
    b_values = write_unet_gguf(b, b_unet)
    # A GGUF carries no demo mark: the small layout's shapes and facts are given, as for any small model.
    opts = RunOptions(arch=SMALL_ARCH, shapes=small_shapes(), output_dtype="fp32", quiet=True, progress=False)
    assert detect_family(open_checkpoint(a)) == "sd1-ldm_unet_only"
    result = run("merge", a, b, out, opts)
    assert result.config == "sd1-ldm_unet_only" and result.units_moved > 0
    merged = load_file(out)
    assert set(merged) == set(a_values)
    # Q8_0 rounds A and pi(B) differently, so the merge is their mean in A's basis, not A itself.
    spec = permutation_spec(
        "sd1-ldm_unet_only", arch=SMALL_ARCH, shapes={k: tuple(v.shape) for k, v in b_values.items()}
    )
    b_in_a = apply_permutation(spec, invert(hidden), b_values)
    expected = {k: (a_values[k] + b_in_a[k]) / 2 for k in a_values}
    assert max(float((merged[k] - expected[k]).abs().max()) for k in expected) < 1e-6
    plain = {k: (a_values[k] + b_values[k]) / 2 for k in a_values}
    assert max(float((merged[k] - plain[k]).abs().max()) for k in expected) > 0.1  # re-based, not averaged
