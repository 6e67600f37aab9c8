"""sd-mecha's own `rebasin` interface after `import sd_mecha_rebasin` (sd_mecha_rebasin/mecha/interface.py).

`sd_mecha.rebasin(b, a)` must reach our implementation for the config sd-mecha infers (SD1, SD2,
SDXL; never an SDXL candidate for SD1), recover a hidden permutation exactly, and serialize to
`.mecha` files that merge bit-identically in a fresh process. The builtin stays reachable.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import sd_mecha
import torch
from safetensors.torch import load_file
from sd_mecha.extensions import merge_methods as mecha_methods
from test_cli import config_shapes, sparse
from test_merge_method import (  # noqa: F401  (fixtures)
    CONFIGS,
    _one_torch_thread,
    _run_python,
    assert_same,
    tiny,
)

import sd_mecha_rebasin
from sd_mecha_rebasin.mecha import interface as mecha_interface
from sd_mecha_rebasin.mecha.interface import implementation_identifier

BUILTIN = "rebasin_sdxl_sgm"
INTERFACE = mecha_methods.resolve("rebasin").interface


def test_implementations_are_registered_after_the_builtin_which_stays():
    registered = [method.identifier for method, _ in INTERFACE.candidates]
    assert registered == [BUILTIN, *(implementation_identifier(c) for c in mecha_interface.CONFIGS)]
    assert mecha_methods.resolve(BUILTIN) is INTERFACE.candidates[0][0]
    for config in mecha_interface.CONFIGS:
        method = mecha_methods.resolve(implementation_identifier(config))
        names = list(method.get_signature().parameters)
        # the interface's parameters first, in its order; ours after them
        assert names == ["a", "ref", "iters", "seed", "threads", "device", "precision", "kwargs"]
        assert method.get_signature().parameters["iters"].default == 10  # the interface's default
        assert method.get_signature().return_annotation.data.model_config.identifier == config
    assert sd_mecha_rebasin.mecha.interface.register_implementations() == mecha_interface.IMPLEMENTATIONS


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_sd_mecha_rebasin_dispatches_to_ours_and_recovers_a_hidden_permutation(tiny, family):  # noqa: F811  (the imported fixture)
    t = tiny(family)
    fine = t.fine_tune(seed=71)
    b = t.model("fine71_permuted72", t.permuted(fine, seed=72), config=None)  # config inferred
    ref = t.model("ref", t.ref, config=None)
    node = sd_mecha.rebasin(b, ref)
    assert node.merge_method.identifier == implementation_identifier(CONFIGS[family])
    assert_same(t.merge(node), fine)  # the permutation undone exactly, every key


@pytest.mark.parametrize("config", [None, "sd1-ldm"], ids=["inferred", "explicit"])
def test_sd1_never_reaches_an_sdxl_implementation(tiny, config):  # noqa: F811  (the imported fixture)
    t = tiny("sd1")
    a = t.model("ref", t.ref, config=config)
    sdxl_candidates = {
        m.identifier
        for m, s in INTERFACE.candidates
        if s.parameters["a"].annotation.data.model_config.identifier == "sdxl-sgm"
    }
    assert sdxl_candidates == {BUILTIN, "git_rebasin_sdxl_sgm"}
    for args in ((a, a), (a, a, 3)):
        assert sd_mecha.rebasin(*args).merge_method.identifier == "git_rebasin_sd1_ldm"
    # why the order matters: sd-mecha's own dispatch (registration order) gives an inferred SD1
    # file to the builtin SDXL candidate, which then fails on the missing SDXL keys
    if config is None:
        plain = mecha_methods.MergeMethodInterface.dispatch(INTERFACE, a, a, 10)
        assert plain.merge_method.identifier == BUILTIN


def test_a_unet_only_sd1_file_goes_to_sd1_not_sd2(tmp_path):
    """By key names, a UNet-only SD1 file is as much sd2-ldm (sd-mecha picks it: ties go to the
    identifier that sorts last); the cross-attention width (768, not 1024) says SD1. A header-only
    file with the real SD1 UNet shapes: dispatch reads no tensor data."""
    path = sparse(tmp_path / "unet.safetensors", config_shapes("sd1-ldm", ("diffuser",)))
    unet = sd_mecha.model(path)
    with sd_mecha.open_graph(unet, root_only=True) as graph:
        assert graph.root_candidates().model_config.finalize().identifier == "sd2-ldm"
    assert mecha_interface.inferred_config(unet) == "sd1-ldm"
    assert sd_mecha.rebasin(unet, unet).merge_method.identifier == "git_rebasin_sd1_ldm"


def test_sdxl_dispatches_to_ours_before_the_builtin_which_stays_callable(tiny):  # noqa: F811  (the imported fixture)
    t = tiny("sdxl")
    a = t.model("ref", t.ref, config="sdxl-sgm")
    assert sd_mecha.rebasin(a, a).merge_method.identifier == "git_rebasin_sdxl_sgm"
    assert mecha_methods.resolve(BUILTIN)(a, a, 10).merge_method.identifier == BUILTIN


def test_dispatch_order_prefers_the_inferred_config_then_ours():
    order = [
        m.identifier
        for m, _ in mecha_interface.dispatch_order(INTERFACE.candidates, "sdxl-sgm", {"git_rebasin_sdxl_sgm"})
    ]
    unet_only = [implementation_identifier(c) for c in mecha_interface.CONFIGS[3:]]  # UNet-only layouts
    assert order == [
        "git_rebasin_sdxl_sgm",
        BUILTIN,
        "git_rebasin_sd1_ldm",
        "git_rebasin_sd2_ldm",
        *unet_only,
    ]
    ours = {implementation_identifier(c) for c in mecha_interface.CONFIGS}
    order = [m.identifier for m, _ in mecha_interface.dispatch_order(INTERFACE.candidates, None, ours)]
    assert order == [
        "git_rebasin_sd1_ldm",
        "git_rebasin_sd2_ldm",
        "git_rebasin_sdxl_sgm",
        *unet_only,
        BUILTIN,
    ]


@pytest.mark.parametrize("version", ["1.1.5", "1.3.0", "2.0.0"])
def test_dispatch_is_left_alone_on_an_unexpected_sd_mecha_version(version):
    fresh = copy.copy(INTERFACE)
    del fresh.dispatch  # sd-mecha's own method again
    with pytest.warns(RuntimeWarning, match=rf"sd-mecha {version} is outside the tested range"):
        assert not mecha_interface.install_dispatch(fresh, version=version)
    assert fresh.dispatch.__func__ is mecha_methods.MergeMethodInterface.dispatch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mecha_interface.install_dispatch(fresh, version="1.1.9")
        assert getattr(fresh.dispatch, "_sd_mecha_rebasin", False)
        assert mecha_interface.install_dispatch(fresh, version="1.1.8")  # already in place
        assert mecha_interface.install_dispatch(fresh, version="1.2.0")  # the development branch


def test_mecha_files_written_either_way_merge_bit_identically_in_a_fresh_process(tiny, tmp_path):  # noqa: F811  (the imported fixture)
    t = tiny("sd1")
    fine = t.fine_tune(seed=81)
    ref = t.model("ref", t.ref)
    b = t.model("fine81_permuted82", t.permuted(fine, seed=82))
    recipes = {
        "interface": sd_mecha.weighted_sum(ref, sd_mecha.rebasin(b, ref), alpha=0.4),
        "git_rebasin": sd_mecha.weighted_sum(ref, sd_mecha_rebasin.rebasin(b, ref), alpha=0.4),
    }
    expected = t.merge(sd_mecha.weighted_sum(ref, t.model("fine81", fine), alpha=0.4))
    paths = {}
    for name, recipe in recipes.items():
        text = sd_mecha.serialize(recipe, finalize=False)
        assert f'merge "{"git_rebasin_sd1_ldm" if name == "interface" else "git_rebasin"}"' in text
        paths[name] = tmp_path / f"{name}.mecha"
        paths[name].write_text(text)
        assert_same(t.merge(recipe), expected)

    done = _run_python(f"""
        import pathlib, torch, sd_mecha, sd_mecha_rebasin
        torch.set_num_threads(1)
        from support import tiny_merge
        from support.layouts import arch_overrides
        from sd_mecha_rebasin.mecha.merge_method import arch_override
        for name in ("interface", "git_rebasin"):
            recipe = sd_mecha.deserialize_path(pathlib.Path({str(tmp_path)!r}) / f"{{name}}.mecha")
            with arch_override("sd1-ldm", arch_overrides("sd1", "tiny")):
                tiny_merge.merge(recipe, output=f"{tmp_path}/{{name}}.safetensors", output_dtype=torch.float32)
    """)
    assert done.returncode == 0, done.stderr
    for name in recipes:
        assert_same(load_file(str(tmp_path / f"{name}.safetensors")), expected)


def test_iters_is_passed_through_the_interface(tiny):  # noqa: F811  (the imported fixture)
    """`iters=0` through the interface: no sweep may run, so B stays permuted (unlike the default)."""
    t = tiny("sd1")
    permuted = t.permuted(t.ref, seed=91)
    b, ref = t.model("ref_permuted91", permuted), t.model("ref", t.ref)
    assert_same(t.merge(sd_mecha.rebasin(b, ref, 0)), permuted)
    assert not torch.equal(
        permuted["model.diffusion_model.out.0.weight"], t.ref["model.diffusion_model.out.0.weight"]
    )
