"""Block weights (MBW) with re-basin: `sd_mecha_rebasin/mecha/blocks.py` and `sd-rebasin merge --alpha`.

A per-block alpha of 0 everywhere except one block at 1 must give A's weights, bit for bit, on
every key outside that block, and re-based B's weights (here: the un-permuted fine-tune that B is a
permutation of) on every key inside it.
"""

from __future__ import annotations

import json

import pytest
import sd_mecha
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from support import tiny_merge
from support.layouts import arch_overrides
from test_cli import assert_one_line_error, only_inputs_left, pair, run_cli  # noqa: F401  (fixtures)
from test_merge_method import _one_torch_thread, assert_same, quiet_tqdm, tiny  # noqa: F401  (fixtures)
from test_recipes import merge as recipes_merge
from test_recipes import merge_mecha, models  # noqa: F401  (fixture)

from sd_mecha_rebasin import rebasin
from sd_mecha_rebasin.mecha.blocks import Alpha, block_names, parse_alpha, sd2_block_of
from sd_mecha_rebasin.mecha.merge_method import arch_override

UNET = "model.diffusion_model."

SD1_ORDER = "BASE, IN00..IN11, M00, OUT00..OUT11"
SDXL_ORDER = "BASE, IN00..IN08, M00, OUT00..OUT08"


def in_block(key: str, block: str) -> bool:
    """Independent of the conversions: which keys a UNet input/output block holds."""
    kind, index = {"IN": "input_blocks", "OU": "output_blocks"}[block[:2]], int(block.lstrip("INOUT"))
    return key.startswith(f"{UNET}{kind}.{index}.")


# ---------------------------------------------------------------------------------------------
# Parsing


def test_the_forms_of_alpha():
    assert parse_alpha("0.3") == Alpha("0.3", scalar=0.3)
    assert parse_alpha(0.25).scalar == 0.25
    sd1 = parse_alpha(",".join(str(i / 100) for i in range(26))).blocks("sd1-ldm")
    assert list(sd1) == ["BASE", *(f"IN{i:02}" for i in range(12)), "M00", *(f"OUT{i:02}" for i in range(12))]
    assert sd1["BASE"] == 0.0 and sd1["IN00"] == 0.01 and sd1["M00"] == 0.13 and sd1["OUT11"] == 0.25
    sdxl = parse_alpha(" ".join(["0.5"] * 19 + ["0.7"])).blocks("sdxl-sgm")  # spaces separate too
    assert len(block_names("sdxl-sgm")) == 20 and sdxl["OUT08"] == 0.7 and sdxl["VAE"] == sdxl["BASE"] == 0.5
    named = parse_alpha("in00=0, OUT11=1, default=0.25", default=0.9).blocks("sd2-ldm")
    assert named["IN00"] == 0.0 and named["OUT11"] == 1.0 and named["M00"] == 0.25  # default= wins
    assert parse_alpha("M00=1", default=0.9).blocks("sd1-ldm")["BASE"] == 0.9  # --alpha-default
    assert parse_alpha("VAE=1,BASE=0.2,default=0").blocks("sdxl-sgm")["VAE"] == 1.0


@pytest.mark.parametrize(
    ("text", "config", "message"),
    [
        ("0,1,0", "sd1-ldm", f"--alpha has 3 numbers; SD1 block weights take 26, one per block in this order: {SD1_ORDER}"),
        ("," .join(["0"] * 26), "sdxl-sgm", f"--alpha has 26 numbers; SDXL block weights take 20, one per block in this order: {SDXL_ORDER}"),
        ("," .join(["0"] * 20), "sd2-ldm", "--alpha has 20 numbers; SD2 block weights take 26"),
        ("IN11=1,default=0", "sdxl-sgm", "--alpha: unknown SDXL block(s) IN11"),
        ("IN00=1", "sd1-ldm", "no value for 25 SD1 block(s)"),
    ],
)  # fmt: skip
def test_a_wrong_form_for_the_family_names_the_expected_count_and_family(text, config, message):
    with pytest.raises(ValueError) as e:
        parse_alpha(text).blocks(config)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.5,x", "'x' is not a number"),
        ("1,IN00=1", "'1' has no block name"),
        ("IN00=1,in00=0", "block IN00 is given twice"),
        ("", "--alpha is empty"),
    ],
)
def test_malformed_alpha_is_a_one_line_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_alpha(text)


def test_sd2_conversion_follows_sd_mechas_sd1_rules():
    """Our sd2-ldm conversion and sd-mecha's sd1-ldm conversion put the UNet keys both configs
    share in the same block."""
    from sd_mecha.extensions import model_configs

    sd1, sd2 = (set(model_configs.resolve(c).keys()) for c in ("sd1-ldm", "sd2-ldm"))
    shared = sorted(k for k in sd1 & sd2 if k.startswith(UNET))
    blocks = {name: float(i) for i, name in enumerate(block_names("sd1-ldm"))}
    node = sd_mecha.convert(sd_mecha.literal(blocks, config="sd1-supermerger_blocks"), "sd1-ldm")
    values = tiny_merge.merge(node, output_dtype=torch.float32, check_extra_keys=False, tqdm=quiet_tqdm)
    assert len(shared) > 600
    names = block_names("sd1-ldm")
    assert [names[int(values[k])] for k in shared] == [sd2_block_of(k) for k in shared]
    assert sd2_block_of("cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight") == "BASE"


# ---------------------------------------------------------------------------------------------
# Merging


@pytest.mark.parametrize(("family", "block"), [("sd1", "IN04"), ("sd2", "OUT05"), ("sdxl", "IN04")])
def test_one_block_at_one_gives_rebased_b_there_and_a_bit_for_bit_elsewhere(tiny, family, block):  # noqa: F811
    t = tiny(family)
    fine = t.fine_tune(seed=21)
    a = t.model("ref", t.ref)
    b = t.model("fine21_permuted22", t.permuted(fine, seed=22))
    alpha = parse_alpha(f"{block}=1,default=0").node(t.config)
    out = t.merge(sd_mecha.weighted_sum(a, rebasin(b, a), alpha=alpha))
    inside = {k for k in t.ref if in_block(k, block)}
    assert len(inside) > 10
    assert out.keys() == t.ref.keys()
    changed = [k for k in t.ref if k not in inside and not torch.equal(out[k], t.ref[k])]
    assert not changed, f"{len(changed)} keys outside {block} are not A's, e.g. {changed[:3]}"
    wrong = [k for k in inside if not torch.equal(out[k], fine[k])]
    assert not wrong, f"{len(wrong)} keys of {block} are not re-based B's, e.g. {wrong[:3]}"
    assert any(not torch.equal(fine[k], t.ref[k]) for k in inside)


# ---------------------------------------------------------------------------------------------
# Command line


def test_help_lists_the_block_order_of_each_family(capsys):
    rc, out, _ = run_cli(capsys, "merge", "--help")
    text = " ".join(out.split())
    assert rc == 0
    assert f"SD1 and SD2 (26): {SD1_ORDER}" in text and f"SDXL (20): {SDXL_ORDER}" in text
    assert "--alpha-default" in text


@pytest.mark.parametrize(
    ("alpha", "needle"),
    [
        ("0,1", "--alpha has 2 numbers; SD1 block weights take 26, one per block in this order"),
        ("IN00=1", "no value for 25 SD1 block(s)"),
        ("IN00=1.5,default=0", "must lie in [0, 1]"),
        ("IN00=x", "'x' is not a number"),
    ],
)
def test_cli_wrong_block_weights_are_one_line_errors_before_any_work(pair, tmp_path, capsys, alpha, needle):  # noqa: F811
    a, b = pair
    rc, _, err = run_cli(capsys, "merge", a, b, "--alpha", alpha)
    assert_one_line_error(rc, err, 2, needle)
    only_inputs_left(tmp_path, *pair)


def test_cli_block_weights_end_to_end(tiny, tmp_path):  # noqa: F811
    """`merge --alpha IN04=1 --alpha-default 0` through the CLI's job (`jobs.run`), tiny SD1 files."""
    from support.layouts import arch_overrides, key_shapes

    from sd_mecha_rebasin.cli import jobs

    t = tiny("sd1")
    fine = t.fine_tune(seed=31)
    a, b = t.file("ref", t.ref), t.file("fine31_permuted32", t.permuted(fine, seed=32))
    opts = jobs.RunOptions(
        output_dtype="fp32",
        quiet=True,
        progress=False,
        threads=1,
        arch=arch_overrides("sd1", "tiny"),
        shapes=key_shapes("sd1", "tiny"),
    )
    out_path = tmp_path / "merged.safetensors"
    result = jobs.run("merge", a, b, out_path, opts, alpha=parse_alpha("IN04=1", default=0.0))
    assert result.alpha["IN04"] == 1.0 and result.alpha["IN05"] == 0.0
    out = load_file(str(out_path))
    for key, value in t.ref.items():
        assert torch.equal(out[key], fine[key] if in_block(key, "IN04") else value), key
    with safe_open(str(out_path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["sd_merge_recipe"])["alpha"]["IN04"] == 1.0
    assert "convert_sd1_blocks_to_ldm" in meta["mecha_recipe"]


# ---------------------------------------------------------------------------------------------
# The recipe (recipes/block_weights_rebasin.py and its .mecha file)


def test_block_weights_recipe_mecha_and_script(models, capsys):  # noqa: F811
    import block_weights_rebasin

    m = models("B", A=None, B=1)
    per_key = parse_alpha(block_weights_rebasin.OUTER_TO_B).node("sd1-ldm")
    expected = recipes_merge(sd_mecha.weighted_sum(m["A"], m["B"], alpha=per_key))
    assert_same(merge_mecha("block_weights_rebasin"), expected)
    with arch_override("sd1-ldm", arch_overrides("sd1", "tiny")):
        args = "A.safetensors B.safetensors out.safetensors --alpha IN04=1 --alpha-default 0.25 --dtype fp32"
        block_weights_rebasin.main(args.split())
    per_key = parse_alpha("IN04=1,default=0.25").node("sd1-ldm")
    assert_same(
        load_file("out.safetensors"), recipes_merge(sd_mecha.weighted_sum(m["A"], m["B"], alpha=per_key))
    )
    with pytest.raises(SystemExit):  # argparse's one-line error: 3 numbers for SD1's 26 blocks
        block_weights_rebasin.main("A.safetensors B.safetensors out2.safetensors --alpha 0,1,0".split())
    assert "SD1 block weights take 26" in capsys.readouterr().err
