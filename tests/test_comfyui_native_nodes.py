"""This package's own ComfyUI nodes (comfyui/custom_nodes/sd_mecha_rebasin_nodes) in the real ComfyUI
of issue 32.1 (the snapshot's 0.3.64 on CPU, tests/support/comfyui_server.py), with no other node
pack but the test-only one that lets ComfyUI load the demo's small SD1 models:

- the node list holds Re-Basin Align, Re-Basin Merge and Re-Basin Merge Many with their inputs;
- loaders -> Re-Basin Align -> CheckpointSave writes `sd-rebasin align B --ref A`'s UNet and text
  encoder, bit for bit;
- loaders -> Re-Basin Align -> ModelMergeSimple + CLIPMergeSimple (ratio 0.75: A's weight) ->
  CheckpointSave writes `sd-rebasin merge A B --alpha 0.25`'s tensors up to rounding (ComfyUI
  computes `0.75 A + 0.25 B'` in float32 and keeps a weight in its own dtype, sd-mecha
  `lerp(A, B', 0.25)`: one unit in the last place of that dtype); Re-Basin Merge writes the
  same file as that workflow, bit for bit;
- Re-Basin Merge Many over A, B, C writes `sd-rebasin merge-many A B C`'s file (every tensor,
  bit for bit) into models/checkpoints/ and returns it loaded (saved again: the same values);
- a checkpoint name the loaders do not list is a one-line node error.

A carries a full-size random SD1 VAE (ComfyUI's VAE has fixed widths, and CheckpointSave needs
one); B and C have none. Compared on the UNet and text-encoder keys: ComfyUI's save has no CLIP
position ids and its own VAE copy.

Skipped, in one line naming what is missing, without the snapshot or `.venv-comfyui`.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from support.comfyui_server import REPO, ComfyUI, ComfyUIError, what_is_missing

MISSING = what_is_missing()
pytestmark = [pytest.mark.skipif(MISSING is not None, reason=f"no real ComfyUI: {MISSING}"), pytest.mark.slow]

PACK = REPO / "comfyui" / "custom_nodes" / "sd_mecha_rebasin_nodes"
SMALL_PACK = REPO / "tests" / "support" / "comfyui_small_sd1"
COMPARED = ("model.diffusion_model.", "cond_stage_model.transformer.text_model.")
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def _small_models(folder: pathlib.Path) -> list[pathlib.Path]:
    """A (with a full-size VAE), B, C: the demo's small SD1 layout; B and C are A under random
    legal permutations plus noise."""
    from sd_mecha_rebasin import model_configs
    from sd_mecha_rebasin.architectures.small import DEMO_LAYOUT, DEMO_LAYOUT_KEY, small_shapes
    from sd_mecha_rebasin.cli.demo import make_models, random_weights
    from sd_mecha_rebasin.files.output import write_safetensors
    from sd_mecha_rebasin.permutations.spec import apply_permutation, random_permutation

    a, b, _, spec = make_models(seed=0)
    weights = {k: a[k] for k in small_shapes()}
    c = apply_permutation(spec, random_permutation(spec, 7), weights)
    gen = torch.Generator().manual_seed(8)
    c = {k: t + 0.02 * t.std() * torch.randn(t.shape, generator=gen) for k, t in c.items()}
    c.update({k: t for k, t in a.items() if k not in weights})
    vae = model_configs.resolve("sd1-ldm").components()["vae"].keys()
    a = {**a, **random_weights({k: tuple(m.shape) for k, m in vae.items()}, 100)}
    paths = []
    for name, sd in (("A", a), ("B", b), ("C", c)):
        path = folder / f"{name}.safetensors"
        write_safetensors(path, {k: t.half() for k, t in sd.items()}, {DEMO_LAYOUT_KEY: DEMO_LAYOUT})
        paths.append(path)
    return paths


def _cli(args: list[str], cwd: pathlib.Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sd_mecha_rebasin", *args, "-q"], cwd=cwd, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _loader(name: str) -> dict:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}


def _save(model: list, clip: list, prefix: str) -> dict:
    return {
        "class_type": "CheckpointSave",
        "inputs": {"model": model, "clip": clip, "vae": ["a", 2], "filename_prefix": f"checkpoints/{prefix}"},
    }


OPTIONS = {"iters": 100, "seed": 0, "device": "cpu"}


def align_workflows() -> dict:
    """Re-Basin Align saved as it is, and into ModelMergeSimple + CLIPMergeSimple; Re-Basin Merge."""
    return {
        "a": _loader("A.safetensors"),
        "b": _loader("B.safetensors"),
        "align": {
            "class_type": "RebasinAlign",
            "inputs": {
                "model_a": ["a", 0],
                "model_b": ["b", 0],
                "clip_a": ["a", 1],
                "clip_b": ["b", 1],
                **OPTIONS,
            },
        },
        "save_aligned": _save(["align", 0], ["align", 1], "aligned"),
        "mm": {
            "class_type": "ModelMergeSimple",
            "inputs": {"model1": ["a", 0], "model2": ["align", 0], "ratio": 0.75},
        },
        "cm": {
            "class_type": "CLIPMergeSimple",
            "inputs": {"clip1": ["a", 1], "clip2": ["align", 1], "ratio": 0.75},
        },
        "save_merged": _save(["mm", 0], ["cm", 0], "merged"),
        "merge": {
            "class_type": "RebasinMerge",
            "inputs": {
                "model_a": ["a", 0],
                "model_b": ["b", 0],
                "clip_a": ["a", 1],
                "clip_b": ["b", 1],
                "ratio": 0.75,
                **OPTIONS,
            },
        },
        "save_merge_node": _save(["merge", 0], ["merge", 1], "merge_node"),
    }


def many_workflow(more: str = "", output: str = "many.safetensors") -> dict:
    return {
        "a": _loader("A.safetensors"),
        "many": {
            "class_type": "RebasinMergeMany",
            "inputs": {
                "ckpt_name_1": "A.safetensors",
                "ckpt_name_2": "B.safetensors",
                "ckpt_name_3": "C.safetensors",
                "more_checkpoints": more,
                "weights": "",
                "output_name": output,
                "overwrite": False,
                "max_passes": 100,
                "output_dtype": "fp16",
                **OPTIONS,
            },
        },
        "save": {
            "class_type": "CheckpointSave",
            "inputs": {
                "model": ["many", 0],
                "clip": ["many", 1],
                "vae": ["many", 2],
                "filename_prefix": "checkpoints/many_saved",
            },
        },
    }


def _compared(path: pathlib.Path) -> dict[str, torch.Tensor]:
    return {k: t for k, t in load_file(path).items() if k.startswith(COMPARED) and k != POSITION_IDS}


def assert_equal(comfy: dict[str, torch.Tensor], cli: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert sorted(comfy) == sorted(cli)
    for key in cli:
        expected, actual = cli[key].double(), comfy[key].double()
        if exact:
            assert torch.equal(actual, expected), key
        else:  # two formulas of one weighted sum, rounded to the dtype ComfyUI holds the weight in
            eps = max(torch.finfo(comfy[key].dtype).eps, 2**-22)
            torch.testing.assert_close(actual, expected, rtol=eps, atol=1e-7, msg=key)


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    folder = tmp_path_factory.mktemp("native")
    models = folder / "models"
    models.mkdir()
    paths = _small_models(models)
    server = ComfyUI(folder / "server", {"sd_mecha_rebasin_nodes": PACK, "comfyui_small_sd1": SMALL_PACK})
    for path in paths:
        (server.checkpoints / path.name).write_bytes(path.read_bytes())
    with server:
        yield server, paths


def test_node_list_holds_the_three_nodes(comfyui):
    server, _ = comfyui
    info = server.object_info()
    align, merge, many = (info[n] for n in ("RebasinAlign", "RebasinMerge", "RebasinMergeMany"))
    assert align["display_name"] == "Re-Basin Align" and merge["display_name"] == "Re-Basin Merge"
    assert many["display_name"] == "Re-Basin Merge Many"
    assert set(align["input"]["required"]) == {"model_a", "model_b", "iters", "seed", "device"}
    assert set(align["input"]["optional"]) == {"clip_a", "clip_b"}
    assert align["output"] == ["MODEL", "CLIP"] and many["output"] == ["MODEL", "CLIP", "VAE"]
    assert "ratio" in merge["input"]["required"]
    assert "A.safetensors" in many["input"]["required"]["ckpt_name_1"][0]


def test_align_then_comfyui_merge_nodes_give_the_command_line(comfyui, tmp_path):
    server, (a, b, _) = comfyui
    server.run(align_workflows())
    _cli(["align", b, "--ref", a, "-o", tmp_path / "aligned.safetensors", "--output-dtype", "fp32"], tmp_path)
    _cli(
        ["merge", a, b, "-o", tmp_path / "merged.safetensors", "--alpha", "0.25", "--output-dtype", "fp32"],
        tmp_path,
    )
    (aligned,) = server.outputs("checkpoints/aligned")
    (merged,) = server.outputs("checkpoints/merged")
    (merge_node,) = server.outputs("checkpoints/merge_node")
    cli_aligned = _compared(tmp_path / "aligned.safetensors")
    assert_equal(_compared(aligned), cli_aligned)  # the permutation, bit for bit
    assert not all(torch.equal(t, load_file(b)[k].float()) for k, t in cli_aligned.items())  # B moved
    assert_equal(_compared(merged), _compared(tmp_path / "merged.safetensors"), exact=False)
    assert_equal(_compared(merge_node), _compared(merged))  # one node = the three nodes


def test_merge_many_node_gives_merge_many(comfyui, tmp_path):
    server, paths = comfyui
    server.run(many_workflow())
    _cli(["merge-many", *paths, "-o", tmp_path / "many.safetensors"], tmp_path)
    written = load_file(server.checkpoints / "many.safetensors")
    cli = load_file(tmp_path / "many.safetensors")
    assert sorted(written) == sorted(cli)
    assert all(torch.equal(written[k], cli[k]) for k in cli)
    (saved,) = server.outputs("checkpoints/many_saved")  # loaded by ComfyUI and saved again
    assert_equal(_compared(saved), {k: t for k, t in _compared(tmp_path / "many.safetensors").items()})


def test_unknown_checkpoint_is_a_one_line_node_error(comfyui):
    server, _ = comfyui
    with pytest.raises(ComfyUIError) as caught:
        server.run(many_workflow(more="missing.safetensors", output="never.safetensors"))
    message = str(caught.value).split("\n")[0]
    assert "RebasinMergeMany" in message and "Re-Basin Merge Many: missing.safetensors is not in" in message
    assert not (server.checkpoints / "never.safetensors").exists()
