"""ComfyUI's in-memory key names (key_layouts.MEMORY_RULES) and the alignment of models held in
memory (mecha/memory.py), without ComfyUI: the mapping both ways for SD1, SD2 and SDXL (exact
tensors, q/k/v split and text_projection transposed), an aligned-then-mapped-back B equal to
`sd-rebasin align`'s file, the UNet-only rule, and one-line refusals. The progress adapters of the
nodes with a stand-in bar. ComfyUI's names come from tests/support/comfyui_names.py, written from
ComfyUI's loaders; where the snapshot is here, ComfyUI's own saving converter checks them too."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
from safetensors.torch import load_file
from support.comfyui_names import to_comfyui
from support.layouts import arch_overrides, key_shapes, random_state_dict

from sd_mecha_rebasin.architectures import permutation_spec
from sd_mecha_rebasin.cli.jobs import RunOptions, align_files
from sd_mecha_rebasin.common import events
from sd_mecha_rebasin.common.errors import UserError
from sd_mecha_rebasin.files import key_layouts
from sd_mecha_rebasin.files.output import write_safetensors
from sd_mecha_rebasin.mecha.memory import align_in_memory, read_layout
from sd_mecha_rebasin.permutations.spec import apply_permutation, random_permutation

CONFIGS = {"sd1": "sd1-ldm", "sd2": "sd2-ldm", "sdxl": "sdxl-sgm"}
SNAPSHOT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "comfyui" / "ComfyUI"
POSITION_IDS = "embeddings.position_ids"


def tiny(family: str, seed: int) -> dict[str, torch.Tensor]:
    return random_state_dict(key_shapes(family, "tiny"), seed)


# --------------------------------------------------------------------------------------------
# The mapping as data, both ways


EXAMPLES = {
    "sd1": {
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            "same",
        ),
        "clip_l.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight": (
            "cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight",
            "same",
        ),
    },
    "sd2": {
        "clip_h.transformer.text_model.encoder.layers.5.self_attn.v_proj.bias": (
            "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_bias",
            "cat",
        ),
        "clip_h.transformer.text_model.encoder.layers.5.mlp.fc1.weight": (
            "cond_stage_model.model.transformer.resblocks.5.mlp.c_fc.weight",
            "same",
        ),
        "clip_h.transformer.text_projection.weight": ("cond_stage_model.model.text_projection", "t"),
        "clip_h.logit_scale": ("cond_stage_model.model.logit_scale", "same"),
    },
    "sdxl": {
        "clip_l.transformer.text_model.final_layer_norm.weight": (
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "same",
        ),
        "clip_g.transformer.text_model.encoder.layers.31.self_attn.q_proj.weight": (
            "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
            "cat",
        ),
        "clip_g.transformer.text_model.embeddings.position_embedding.weight": (
            "conditioner.embedders.1.model.positional_embedding",
            "same",
        ),
        "clip_g.transformer.text_projection.weight": ("conditioner.embedders.1.model.text_projection", "t"),
        "diffusion_model.label_emb.0.0.weight": ("model.diffusion_model.label_emb.0.0.weight", "same"),
    },
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_comfyui_names_read_as_the_checkpoint_and_back_exactly(family):
    canonical = tiny(family, 0)
    comfy = to_comfyui(family, canonical)
    layout, kept = read_layout(comfy, key_layouts.COMFYUI, "model")
    comfy_only = {"clip_l.transformer.text_projection.weight", "clip_l.logit_scale"}
    assert set(comfy) - set(kept) == (comfy_only if family != "sd2" else set())
    # every checkpoint key but the CLIP-L position ids (ComfyUI has none), exactly
    expected = {k: t for k, t in canonical.items() if not k.endswith(POSITION_IDS)}
    assert sorted(layout.sources) == sorted(expected)
    read = dict(layout.read(list(layout.sources), lambda keys: ((k, kept[k]) for k in keys)))
    for key, tensor in expected.items():
        assert read[key].dtype == tensor.dtype and torch.equal(read[key], tensor), key
    # back: every ComfyUI key once, its own tensor, exactly
    back: dict[str, torch.Tensor] = {}
    for key, tensor in read.items():
        for name, part in layout.to_source(key, tensor):
            assert name not in back
            back[name] = part
    assert sorted(back) == sorted(kept)
    for name, tensor in kept.items():
        assert torch.equal(back[name], tensor), name
    for name, (key, op) in EXAMPLES[family].items():
        assert name in layout.sources[key].keys and layout.sources[key].op == op


def test_memory_only_keys_and_file_reading_untouched():
    """ComfyUI's CLIP-L projection and logit scale are left out; files never read ComfyUI's names."""
    only = key_layouts.MEMORY_ONLY[key_layouts.COMFYUI]
    assert only.fullmatch("clip_l.logit_scale") and only.fullmatch(
        "clip_l.transformer.text_projection.weight"
    )
    assert not only.fullmatch("clip_g.logit_scale")
    shapes = {"diffusion_model.out.2.weight": (4, 320, 3, 3)}
    layout = key_layouts.plan(pathlib.Path("f.safetensors"), shapes, {k: torch.float16 for k in shapes})
    assert list(layout.sources) == ["diffusion_model.out.2.weight"] and layout.identity


@pytest.mark.skipif(not (SNAPSHOT / "comfy" / "diffusers_convert.py").is_file(), reason="no ComfyUI snapshot")
@pytest.mark.parametrize(("family", "prefix"), [("sd2", "clip_h"), ("sdxl", "clip_g")])
def test_comfyui_own_saving_converter_agrees(family, prefix, monkeypatch):
    """ComfyUI's `convert_text_enc_state_dict_v20` (what its checkpoint save runs on an OpenCLIP
    encoder) turns our test's ComfyUI names back into the checkpoint's, tensors exactly."""
    monkeypatch.syspath_prepend(str(SNAPSHOT))
    from comfy.diffusers_convert import convert_text_enc_state_dict_v20

    canonical = tiny(family, 1)
    comfy = {k: t for k, t in to_comfyui(family, canonical).items() if k.startswith(prefix + ".")}
    saved = convert_text_enc_state_dict_v20(comfy, prefix)
    target = {"clip_h": "cond_stage_model.model", "clip_g": "conditioner.embedders.1.model"}[prefix]
    saved = {target + k[len(prefix) :]: t for k, t in saved.items()}
    expected = {k: t for k, t in canonical.items() if k.startswith(target + ".")}
    assert sorted(saved) == sorted(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    sys.modules.pop("comfy.diffusers_convert", None)


# --------------------------------------------------------------------------------------------
# Alignment in memory = the command line's alignment


def pair(family: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A, and B = a random legal permutation of A plus noise (fp16)."""
    shapes, arch = key_shapes(family, "tiny"), arch_overrides(family, "tiny")
    a = random_state_dict(shapes, 0, torch.float16)
    spec = permutation_spec(CONFIGS[family], arch=arch, shapes=shapes)
    b = apply_permutation(spec, random_permutation(spec, 1), a)
    noise = random_state_dict(shapes, 2, torch.float16)
    return a, {k: (v.float() + 0.3 * noise[k].float()).half() for k, v in b.items()}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_aligned_then_mapped_back_equals_sd_rebasin_align(family, tmp_path):
    a, b = pair(family)
    shapes, arch = key_shapes(family, "tiny"), arch_overrides(family, "tiny")
    for name, sd in (("A", a), ("B", b)):
        write_safetensors(tmp_path / f"{name}.safetensors", sd, {})
    opts = RunOptions(
        threads=1, iters=3, quiet=True, progress=False, shapes=shapes, arch=arch, metadata=False
    )
    align_files(tmp_path / "B.safetensors", tmp_path / "A.safetensors", tmp_path / "out.safetensors", opts)
    cli = to_comfyui(family, load_file(tmp_path / "out.safetensors"))
    comfy_b = to_comfyui(family, b)
    seen: list[str] = []
    with events.listening(lambda event, data: seen.append(event)):
        result = align_in_memory(
            to_comfyui(family, a), comfy_b, iters=3, threads=1, arch=arch, config=CONFIGS[family]
        )
    assert result.text_encoders and {"phase_start", "sweep_start", "prepass_end"} <= set(seen)
    assert result.patches and set(result.patches) < set(comfy_b)  # the moved keys only
    assert any(k.startswith("clip_") for k in result.patches)
    aligned = {**comfy_b, **result.patches}
    assert sorted(aligned) == sorted(cli)
    different = [k for k in cli if not torch.equal(aligned[k].to(cli[k].dtype), cli[k])]
    assert not different, different[:5]
    unmoved = [k for k in comfy_b if k not in result.patches]
    assert all(torch.equal(comfy_b[k].to(cli[k].dtype), cli[k]) for k in unmoved)


def test_b_without_its_text_encoder_aligns_the_unets_only():
    a, b = pair("sd1")
    arch = arch_overrides("sd1", "tiny")
    comfy_b = to_comfyui("sd1", b, clip=False)
    result = align_in_memory(to_comfyui("sd1", a), comfy_b, iters=2, threads=1, arch=arch, config="sd1-ldm")
    assert not result.text_encoders and result.patches
    assert all(k.startswith("diffusion_model.") for k in result.patches)
    assert not any(k.startswith("cond_stage_model.") for k in result.spec.axes)
    to_k = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert 1 not in result.spec.axes["model." + to_k]  # the context columns stay as they are


# --------------------------------------------------------------------------------------------
# Refusals, one line each


def one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(error.value)
    assert "\n" not in text and isinstance(error.value, UserError)
    for needle in needles:
        assert needle in text, text


def _meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def full_unet(family: str) -> dict[str, torch.Tensor]:
    """A full-size UNet in ComfyUI's names, as shapes only (meta tensors: refusals read no value)."""
    prefix = "model.diffusion_model."
    return _meta(
        {
            "diffusion_model." + k[len(prefix) :]: s
            for k, s in key_shapes(family, "full").items()
            if k.startswith(prefix)
        }
    )


def test_families_that_differ_are_refused_in_one_line():
    with pytest.raises(UserError) as e:
        align_in_memory(full_unet("sd1"), full_unet("sdxl"))
    one_line(e, "model A is SD1, model B is SDXL")


@pytest.mark.parametrize(
    ("keys", "needle"),
    [
        ({"diffusion_model.double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "no input_blocks"),
        ({"clip_l.transformer.text_model.final_layer_norm.weight": (768,)}, "no UNet"),
        ({"diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 1280)}, "refiner"),
    ],
)
def test_a_model_that_cannot_be_rebased_is_refused(keys, needle):
    with pytest.raises(UserError) as e:
        align_in_memory(full_unet("sd1"), _meta(keys))
    one_line(e, "model B", "cannot be re-based", needle)


def test_a_unet_with_keys_the_rules_do_not_know_is_refused():
    """An SD2 unCLIP's label_emb would be left unpermuted while the time embedding moves."""
    sd2 = full_unet("sd2")
    unclip = {**sd2, "diffusion_model.label_emb.0.0.weight": torch.empty(1280, 1536, device="meta")}
    with pytest.raises(UserError) as e:
        align_in_memory(unclip, sd2)
    one_line(e, "model A", "label_emb.0.0.weight", "SD2")


# --------------------------------------------------------------------------------------------
# Progress adapters (ComfyUI's bar stood in for)


class Bar:
    def __init__(self, total: int, log: list):
        self.total, self.log = total, log
        log.append(("new", total))

    def update_absolute(self, value: int, total: int | None = None) -> None:
        self.log.append(("at", value))


def test_event_bar_follows_phases_and_sweeps():
    from sd_mecha_rebasin.comfyui.progress import EventBar

    log: list = []
    listener = EventBar(lambda total: Bar(total, log))
    for event, data in [
        ("phase_start", {"phase": "read", "total": 10, "unit": "key"}),
        ("phase", {"phase": "read", "done": 4}),
        ("prepass_start", {"spaces": 3, "max_iter": 5}),
        ("sweep_start", {"sweep": 1, "total": 3, "objective": 0.0}),
        ("solve", {"sweep": 1, "done": 2, "total": 3, "objective": 1.0}),
    ]:
        listener(event, data)
    assert log == [("new", 10), ("at", 4), ("new", 3), ("at", 2)]
