"""The package in a real ComfyUI (issue 32.1): the snapshot's ComfyUI (0.3.64) started headless on CPU
in its own environment (scripts/setup-comfyui.sh), with comfy-mecha (1.2.60, sd-mecha 1.1.6) and
this package's comfy-mecha extension in place, driven through its HTTP API
(tests/support/comfyui_server.py). The node list holds the documented nodes and inputs, and three
comfy-mecha workflows write the same tensors as the command line, bit for bit:

- Git Rebasin -> Weighted Sum -> Merger -> Save Checkpoint  ==  `sd-rebasin merge A B --alpha 0.25`
- Recipe List of 3 -> Git Rebasin Many -> Merger -> Save     ==  `sd-rebasin merge-many A B C`
- Rebasin (sd-mecha's interface) -> Weighted Sum -> ...      ==  `sd-rebasin merge A B --iters 10`

on the keys both files have: the merge through comfy-mecha's Merger (its default `omit_vae`) and
ComfyUI's checkpoint save leaves out the VAE (`first_stage_model.*`), the CLIP position ids
(ComfyUI's text encoder has none) and the 12 DDPM schedule buffers (`betas`, `alphas_cumprod`, ...),
which the command line copies from A; ComfyUI's file has no key the command line's lacks.

The models are the demo's small SD1 layout (sd1-ldm key names, widths / 10) plus a small VAE
(sd-mecha's sd1-ldm config wants one); the test-only pack tests/support/comfyui_small_sd1 lets
ComfyUI load them and gives the merge nodes their architecture facts. One full-size SD1 pair
(random weights, fp16) proves the real layout with nothing test-only in the server.

Adapted in the test's copy of comfy-mecha, not in the package (see comfyui_server.comfy_mecha_pack):
its `LazyCastingParam` import (absent from this ComfyUI) is guarded, and the `merge_checkpointing`
method its upstream mecha_extensions/ folder defines (the snapshot has no such folder) is a
pass-through stand-in.

Skipped, with one line naming what is missing, without the snapshot (`../shared/comfyui`, or
$COMFYUI_SNAPSHOT) or without `.venv-comfyui`."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from support.comfyui_server import REPO, ComfyUI, comfy_mecha_pack, what_is_missing

MISSING = what_is_missing()
if MISSING is not None:
    pytest.skip(f"no real ComfyUI: {MISSING}", allow_module_level=True)
pytestmark = pytest.mark.slow

CLI_TIMEOUT = 3600
"""Hang guard for one command-line merge (the small ones take seconds)."""

VAE_PREFIX = "first_stage_model."
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
SMALL_VAE_DIMS = {512: 64, 256: 32, 128: 16}
"""The small models' VAE widths (ComfyUI never loads it: the Merger omits the VAE)."""


# -- models ------------------------------------------------------------------------------------------
def _small_models(folder: pathlib.Path) -> list[pathlib.Path]:
    """A, B, C in the demo's small SD1 layout (marked as such, so `sd-rebasin` takes their facts),
    with a small VAE: B and C are A under two random legal permutations plus fine-tune-like noise."""
    from sd_mecha.extensions import model_configs

    from sd_mecha_rebasin.architectures.small import DEMO_LAYOUT, DEMO_LAYOUT_KEY, small_shapes
    from sd_mecha_rebasin.cli.demo import make_models, random_weights
    from sd_mecha_rebasin.files.output import write_safetensors
    from sd_mecha_rebasin.permutations.spec import apply_permutation, random_permutation

    a, b, _, spec = make_models(seed=0)
    weights = {k: a[k] for k in small_shapes()}
    c = apply_permutation(spec, random_permutation(spec, 7), weights)
    gen = torch.Generator().manual_seed(8)
    c = {k: t + 0.02 * t.std() * torch.randn(t.shape, generator=gen) for k, t in c.items()}
    c.update({k: t for k, t in a.items() if k not in weights})  # buffers and position ids, as B's
    vae_shapes = {
        key: tuple(SMALL_VAE_DIMS.get(d, d) for d in meta.shape)
        for key, meta in model_configs.resolve("sd1-ldm").components()["vae"].keys().items()
    }
    paths = []
    for i, (name, sd) in enumerate((("A", a), ("B", b), ("C", c))):
        path = folder / f"{name}.safetensors"
        write_safetensors(path, {**sd, **random_weights(vae_shapes, 100 + i)}, {DEMO_LAYOUT_KEY: DEMO_LAYOUT})
        paths.append(path)
    return paths


def full_size_models(folder: pathlib.Path, seeds: tuple[int, ...]) -> list[pathlib.Path]:
    """Full-size SD1 checkpoints (text encoder, UNet and VAE of sd1-ldm's layout; fp16), one per
    seed: the first random, the others that model under a random legal permutation (the seed's)
    plus fine-tune-like noise, as a fine-tune saved in another basis. (Unrelated random models would
    make weight matching sweep up to its limit: many times the cost, and no more proof.)"""
    from sd_mecha.extensions import model_configs
    from support.layouts import key_shapes, random_state_dict

    from sd_mecha_rebasin.architectures import permutation_spec
    from sd_mecha_rebasin.files.output import write_safetensors
    from sd_mecha_rebasin.permutations.spec import apply_permutation, random_permutation

    vae = model_configs.resolve("sd1-ldm").components()["vae"].keys()
    shapes = {**key_shapes("sd1", "full"), **{k: tuple(m.shape) for k, m in vae.items()}}
    base = random_state_dict(shapes, seeds[0], torch.float16)
    spec = permutation_spec("sd1-ldm")
    paths = []
    for i, seed in enumerate(seeds):
        sd = base
        if i:
            gen = torch.Generator().manual_seed(seed)
            sd = apply_permutation(spec, random_permutation(spec, seed), base)
            for key, t in sd.items():
                if t.numel() > 1 and not key.startswith(VAE_PREFIX):
                    noisy = t.float() + 0.02 * t.float().std() * torch.randn(t.shape, generator=gen)
                    sd[key] = noisy.half()
        path = folder / f"sd1_{seed}.safetensors"
        write_safetensors(path, sd, {})
        paths.append(path)
        del sd
    return paths


# -- command line ------------------------------------------------------------------------------------
def _cli(args: list[str], cwd: pathlib.Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sd_mecha_rebasin", *args, "-q"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


# -- workflows (API format) ----------------------------------------------------------------------------
def _io(name: str, spaces: str = "delta|param|weight") -> str:
    """comfy-mecha's input name for a merge method's recipe parameter."""
    return f"{name} ({spaces})"


MERGER_DEFAULTS = {
    "fallback_model": "none",
    "default_merge_device": "cpu",
    "default_merge_dtype": "fp32",
    "output_device": "cpu",
    "output_dtype": "fp16",
    "total_buffer_size": "0.5G",
    "threads": -1,
    "omit_vae": True,
    "temporary_merge": True,
    "strict_weight_space": True,
    "check_finite_output": True,
    "omit_non_finite_inputs": True,
    "memoize_intermediates": True,
}
"""The Merger's widgets as the UI sends them untouched (an API-format workflow gets no defaults)."""


def _method(class_type: str, inputs: dict) -> dict:
    """A comfy-mecha merge-method node; `merge_checkpointing` is a widget (off by default)."""
    return {"class_type": class_type, "inputs": {**inputs, "merge_checkpointing": False}}


def _loaders(names: list[str]) -> dict:
    return {
        f"m{i}": {
            "class_type": "Model Mecha Recipe",
            "inputs": {"model_path": name, "model_config": "sd1-ldm"},
        }
        for i, name in enumerate(names)
    }


def _save(recipe: list, prefix: str) -> dict:
    return {
        "merger": {"class_type": "Mecha Merger", "inputs": {"recipe": recipe, **MERGER_DEFAULTS}},
        "save": {
            "class_type": "CheckpointSave",
            "inputs": {
                "model": ["merger", 0],
                "clip": ["merger", 1],
                "vae": ["merger", 2],
                "filename_prefix": f"checkpoints/{prefix}",
            },
        },
    }


def pair_workflow(a: str, b: str, alpha: float, prefix: str) -> dict:
    """A, B -> Git Rebasin(a=B, ref=A) -> Weighted Sum(A, that, alpha) -> Merger -> Save Checkpoint."""
    return {
        **_loaders([a, b]),
        "alpha": {"class_type": "Float Mecha Hyper", "inputs": {"value": alpha}},
        "rebasin": _method("Git Rebasin Mecha Recipe", {_io("a"): ["m1", 0], _io("ref"): ["m0", 0]}),
        "sum": _method(
            "Weighted Sum Mecha Recipe",
            {_io("a"): ["m0", 0], _io("b"): ["rebasin", 0], "alpha (0.5)": ["alpha", 0]},
        ),
        **_save(["sum", 0], prefix),
    }


def many_workflow(names: list[str], prefix: str) -> dict:
    """Models -> Recipe List -> Git Rebasin Many (defaults) -> Merger -> Save Checkpoint."""
    return {
        **_loaders(names),
        "list": {
            "class_type": "Mecha Recipe List",
            "inputs": {"count": len(names), **{f"recipe_{i}": [f"m{i}", 0] for i in range(len(names))}},
        },
        "many": _method("Git Rebasin Many Mecha Recipe", {_io("models"): ["list", 0]}),
        **_save(["many", 0], prefix),
    }


def interface_workflow(a: str, b: str, prefix: str) -> dict:
    """A, B -> Rebasin(a=B, ref=A; iters 10, the interface's default) -> Weighted Sum(A, that) -> ..."""
    return {
        **_loaders([a, b]),
        "rebasin": _method("Rebasin Mecha Recipe", {_io("a"): ["m1", 0], _io("ref"): ["m0", 0]}),
        "sum": _method("Weighted Sum Mecha Recipe", {_io("a"): ["m0", 0], _io("b"): ["rebasin", 0]}),
        **_save(["sum", 0], prefix),
    }


# -- comparison ----------------------------------------------------------------------------------------
def assert_same_tensors(comfy_file: pathlib.Path, cli_file: pathlib.Path) -> int:
    """ComfyUI's output equals the command line's on every key both have, bit for bit (as values:
    ComfyUI may hold fp16 merges in fp32, which represents them exactly); the command line's keys
    that ComfyUI's lacks are exactly the VAE, the position ids and the schedule buffers (those the
    inputs have). Returns the number compared."""
    from sd_mecha_rebasin.cli.demo import scheduler_buffers

    comfy, cli = load_file(comfy_file), load_file(cli_file)
    assert not set(comfy) - set(cli), sorted(set(comfy) - set(cli))[:10]
    left_out = set(cli) - set(comfy)
    expected = {k for k in cli if k.startswith(VAE_PREFIX) or k in scheduler_buffers()} | {POSITION_IDS}
    assert left_out == expected, (sorted(left_out - expected)[:10], sorted(expected - left_out)[:10])
    shared = sorted(set(comfy) & set(cli))
    different = [k for k in shared if not torch.equal(comfy[k].to(torch.float64), cli[k].to(torch.float64))]
    assert not different, f"{len(different)} of {len(shared)} keys differ, e.g. {different[:5]}"
    merged = [k for k in shared if k.startswith(("model.diffusion_model.", "cond_stage_model."))]
    assert merged, "no merged key in common"
    return len(shared)


def assert_rebased(out: pathlib.Path, a: pathlib.Path, b: pathlib.Path, alpha: float) -> None:
    """The merge is not the plain weighted sum of A and B (re-basin moved B): the test would pass
    trivially if both sides merged without aligning."""
    merged, sd_a, sd_b = load_file(out), load_file(a), load_file(b)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    plain = ((1 - alpha) * sd_a[key].float() + alpha * sd_b[key].float()).half()
    assert not torch.equal(merged[key].half(), plain)


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("comfyui-small")
    packs = {
        "comfy-mecha": comfy_mecha_pack(folder / "packs"),
        "rebasin_small_sd1": REPO / "tests" / "support" / "comfyui_small_sd1",
    }
    server = ComfyUI(folder / "server", packs)
    models = _small_models(server.checkpoints)
    with server:
        yield server, models


# -- tests ---------------------------------------------------------------------------------------------
def test_object_info_lists_the_documented_nodes_and_inputs(small_server):
    """comfyui/README.md's table: Git Rebasin, Git Rebasin Many and Rebasin, with their inputs and
    defaults as comfy-mecha names them (`<name> (<merge spaces>)`, `<name> (<default>)`); our exact
    `rebasin` implementations get no node."""
    server, _ = small_server
    info = server.object_info()
    by_display = {v["display_name"]: k for k, v in info.items() if v.get("category") == "mecha"}
    assert {"Git Rebasin", "Git Rebasin Many", "Rebasin"} <= set(by_display)

    pair = info[by_display["Git Rebasin"]]["input"]
    assert set(pair["required"]) == {_io("a"), _io("ref")}
    assert {"iters (100)", "seed (0)", "threads (0)", "device (cpu)", "precision (fp32)"} <= set(
        pair["optional"]
    )

    many = info[by_display["Git Rebasin Many"]]["input"]
    assert many["optional"][_io("models")][0] == "MECHA_RECIPE_LIST"
    many_options = {"weights ()", "ref (0)", "member (-1)", "max_passes (100)", "iters (100)", "seed (0)"}
    assert many_options | {"threads (0)", "device (cpu)", "precision (fp32)"} <= set(many["optional"])

    interface = info[by_display["Rebasin"]]["input"]
    assert set(interface["required"]) == {_io("a"), _io("ref")}
    assert "iters (10)" in interface["optional"]

    implementations = {"Git Rebasin Sd1 Ldm", "Git Rebasin Sd2 Ldm", "Git Rebasin Sdxl Sgm"}
    assert not implementations & set(by_display)
    assert "Recipe List" in by_display and "CheckpointSave" in info


def test_pair_workflow_equals_sd_rebasin_merge(small_server, tmp_path):
    server, (a, b, _) = small_server
    server.run(pair_workflow(a.name, b.name, 0.25, "pair"))
    (comfy_out,) = server.outputs("pair")
    cli_out = tmp_path / "cli.safetensors"
    _cli(["merge", str(a), str(b), "--alpha", "0.25", "-o", str(cli_out)], tmp_path)
    assert assert_same_tensors(comfy_out, cli_out) > 0
    assert_rebased(cli_out, a, b, 0.25)


def test_many_workflow_equals_sd_rebasin_merge_many(small_server, tmp_path):
    server, models = small_server
    server.run(many_workflow([m.name for m in models], "many"))
    (comfy_out,) = server.outputs("many")
    cli_out = tmp_path / "cli.safetensors"
    _cli(["merge-many", *map(str, models), "-o", str(cli_out)], tmp_path)
    assert assert_same_tensors(comfy_out, cli_out) > 0
    assert_rebased(cli_out, models[0], models[1], 1 / 3)


def test_interface_workflow_equals_sd_rebasin_merge(small_server, tmp_path):
    server, (a, b, _) = small_server
    server.run(interface_workflow(a.name, b.name, "interface"))
    (comfy_out,) = server.outputs("interface")
    cli_out = tmp_path / "cli.safetensors"
    _cli(["merge", str(a), str(b), "--iters", "10", "-o", str(cli_out)], tmp_path)
    assert assert_same_tensors(comfy_out, cli_out) > 0
    assert_rebased(cli_out, a, b, 0.5)


@pytest.mark.full_size
def test_full_size_sd1_pair_workflow_equals_sd_rebasin_merge(tmp_path):
    """The real layout, nothing test-only in the server: two full-size SD1 models (fp16) through
    Git Rebasin -> Weighted Sum -> Merger -> Save Checkpoint give `sd-rebasin merge`'s tensors."""
    from support.layouts import key_shapes

    server = ComfyUI(tmp_path / "server", {"comfy-mecha": comfy_mecha_pack(tmp_path / "packs")})
    a, b = full_size_models(server.checkpoints, (0, 1))
    with server:
        server.run(pair_workflow(a.name, b.name, 0.25, "full"))
    (comfy_out,) = server.outputs("full")
    cli_out = tmp_path / "cli.safetensors"
    _cli(["merge", str(a), str(b), "--alpha", "0.25", "-o", str(cli_out)], tmp_path)
    # every UNet and text-encoder weight (882: what SNAPSHOT.md saw by hand)
    assert assert_same_tensors(comfy_out, cli_out) == len(key_shapes("sd1", "full"))
    assert_rebased(cli_out, a, b, 0.25)
