"""`git_rebasin` end to end through `sd_mecha.merge`, on tiny models with the real key names.

B is a legal random permutation of a model, so re-basin must find the inverse permutation exactly:
merging `ref` with a permuted copy of itself gives `ref` back bit for bit, and re-basin of a
permuted fine-tune gives the fine-tune back. The tiny safetensors files are read through sd-mecha's
own code paths (config detection, casting, streaming), with `arch_override` supplying the tiny
head and GroupNorm group counts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import sd_mecha
import torch
from safetensors.torch import load_file, save_file
from sd_mecha.extensions import merge_methods as mecha_methods
from support import tiny_merge
from support.forward import max_rel_error, run_model
from support.layouts import arch_overrides, key_shapes, random_state_dict

import sd_mecha_rebasin
from sd_mecha_rebasin import apply_permutation, permutation_spec, random_permutation, rebasin
from sd_mecha_rebasin.common import events
from sd_mecha_rebasin.mecha.merge_method import arch_override
from sd_mecha_rebasin.permutations.spec import Permutations, PermutationSpec, permute_tensor

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {"sd1": "sd1-ldm", "sd2": "sd2-ldm", "sdxl": "sdxl-sgm"}
NOISE = 0.01  # fine-tune-like: 1% of each tensor's std
VAE_KEY = "first_stage_model.decoder.conv_in.weight"  # outside the permutation spec
EMA_KEY, EMA_OF = (
    "model_ema.diffusion_modelinput_blocks00weight",
    "model.diffusion_model.input_blocks.0.0.weight",
)


def quiet_tqdm(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, **kwargs, disable=True)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads; on 2 shared cores they only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise_like(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Per-tensor noise of NOISE times the tensor's std (zero for scalars)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state_dict.items():
        noise = torch.randn(value.shape, generator=gen)
        out[key] = noise * NOISE * value.std() if value.numel() > 1 else torch.zeros_like(value)
    return out


def add(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: a[key] + b[key] for key in a}


@dataclasses.dataclass
class Tiny:
    """A tiny model family: `ref`, fine-tunes of it, and files of their legal random permutations."""

    family: str
    folder: pathlib.Path
    spec: PermutationSpec
    ref: dict[str, torch.Tensor]

    @property
    def config(self) -> str:
        return CONFIGS[self.family]

    def fine_tune(self, seed: int) -> dict[str, torch.Tensor]:
        return add(self.ref, noise_like(self.ref, seed))

    def permutation(self, seed: int) -> Permutations:
        return random_permutation(self.spec, seed)

    def permuted(self, state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        return apply_permutation(self.spec, self.permutation(seed), state_dict)

    def file(self, name: str, state_dict: dict[str, torch.Tensor]) -> pathlib.Path:
        path = self.folder / f"{name}.safetensors"
        if not path.exists():
            save_file(state_dict, str(path))
        return path

    def model(self, name: str, state_dict: dict[str, torch.Tensor], config: str | None = "auto"):
        return sd_mecha.model(self.file(name, state_dict), config=self.config if config == "auto" else config)

    def merge(self, recipe, **kwargs) -> dict[str, torch.Tensor]:
        with arch_override(self.config, arch_overrides(self.family, "tiny")):
            out = tiny_merge.merge(recipe, output_dtype=torch.float32, tqdm=quiet_tqdm, **kwargs)
        out.pop("__metadata__", None)
        return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """`tiny(family)`: that family's Tiny, made once per session (files are written on first use)."""
    made: dict[str, Tiny] = {}

    def get(family: str) -> Tiny:
        if family not in made:
            shapes = key_shapes(family, "tiny")
            spec = permutation_spec(CONFIGS[family], arch=arch_overrides(family, "tiny"), shapes=shapes)
            folder = tmp_path_factory.mktemp(f"tiny_{family}")
            made[family] = Tiny(family, folder, spec, random_state_dict(shapes, seed=0))
        return made[family]

    return get


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not different, f"{len(different)} keys differ, e.g. {different[:3]}"


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b))


# ---------------------------------------------------------------------------------------------
# Registration


def test_registered_under_its_own_identifier():
    assert mecha_methods.resolve("git_rebasin") is rebasin
    assert sd_mecha_rebasin.rebasin is rebasin
    assert mecha_methods.resolve("rebasin") is not rebasin  # sd-mecha's builtin stays as it is
    names = list(rebasin.get_signature().parameters)
    assert names == ["a", "ref", "iters", "seed", "threads", "device", "precision", "kwargs"]


# ---------------------------------------------------------------------------------------------
# Exactness and quality


@pytest.fixture(scope="module")
def ref_with_its_permuted_copy(tiny):
    """sd1 `ref` merged with rebasin of its permuted copy (iters=50, threads=2) and the events heard:
    one merge for the two tests that read it."""
    t = tiny("sd1")
    ref = t.model("ref", t.ref)
    b = t.model("ref_permuted", t.permuted(t.ref, seed=1))
    received: list[tuple[str, dict]] = []
    with events.listening(lambda event, data: received.append((event, data))):
        out = t.merge(sd_mecha.weighted_sum(ref, rebasin(b, ref, iters=50), alpha=0.5), threads=2)
    return out, received


def test_merging_ref_with_its_permuted_copy_gives_ref(tiny, ref_with_its_permuted_copy):
    """(SD2 and SDXL: test_sd2_is_detected_without_a_config and the forward-pass test.)"""
    assert_same(ref_with_its_permuted_copy[0], tiny("sd1").ref)


def test_fine_tune_merge_is_closer_to_ref_by_the_expected_factor(tiny):
    """B = pi(ref + noise). Re-basin undoes pi exactly, so the merge sits at ref + noise / 2;
    without it, every permuted unit is averaged with an unrelated one."""
    t = tiny("sd1")
    noise = noise_like(t.ref, seed=2)
    ref = t.model("ref", t.ref)
    b_values = t.permuted(add(t.ref, noise), seed=1)
    b = t.model("fine_permuted", b_values)
    aligned = t.merge(sd_mecha.weighted_sum(ref, rebasin(b, ref), alpha=0.5))
    plain = {k: 0.5 * t.ref[k] + 0.5 * b_values[k] for k in t.ref}  # sd_mecha.weighted_sum(ref, b), 0.5
    half_noise = 0.5 * distance(noise, {k: torch.zeros_like(v) for k, v in noise.items()})
    assert distance(aligned, t.ref) == pytest.approx(half_noise, rel=1e-4)
    assert distance(plain, t.ref) > 50 * distance(aligned, t.ref)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_permuted_model_written_by_sd_mecha_computes_the_same_function(tiny, family):
    t = tiny(family)
    fine = t.fine_tune(seed=3)
    b_values = t.permuted(fine, seed=4)
    out = t.merge(rebasin(t.model("fine3_permuted4", b_values), t.model("ref", t.ref)))
    assert_same(out, fine)  # pi found exactly: the output is the un-permuted fine-tune
    assert max_rel_error(run_model(family, "tiny", dict(b_values)), run_model(family, "tiny", out)) <= 1e-5


def _fine5_recipe(t: Tiny, threads: int):
    ref = t.model("ref", t.ref)
    b = t.model("fine5_permuted6", t.permuted(t.fine_tune(seed=5), seed=6))
    return sd_mecha.weighted_sum(ref, rebasin(b, ref, iters=30, seed=3, threads=threads), alpha=0.4)


@pytest.fixture(scope="module")
def one_thread_merge(tiny):
    """A recipe with non-default iters and seed, and its merge on one thread everywhere: the threads
    test and the fresh-process round trip both compare against it."""
    t = tiny("sd1")
    recipe = _fine5_recipe(t, threads=1)
    return recipe, t.merge(recipe, threads=0)


def test_sd_mecha_threads_do_not_change_the_result(tiny, one_thread_merge):
    t = tiny("sd1")
    assert_same(t.merge(_fine5_recipe(t, threads=2), threads=2), one_thread_merge[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_device_and_prepass_device(tiny):
    t = tiny("sd1")
    ref = t.model("ref", t.ref)
    fine = t.fine_tune(seed=7)
    b = t.model("fine7_permuted8", t.permuted(fine, seed=8))
    assert_same(t.merge(rebasin(b, ref, device="cuda"), merge_device="cuda", threads=2), fine)


# ---------------------------------------------------------------------------------------------
# Recipe nodes as inputs, chaining


def test_inputs_may_be_recipe_nodes(tiny):
    """`a` and `ref` are merge nodes, and `ref` is shared with the root (sd-mecha memoizes it).

    Both fine-tunes in `a` share one permutation, so their average is that permutation of the
    average; the 1% noise in `ref` does not hide the permutation. (Chaining with subtract,
    ties_sum and add_difference: tests/test_recipes.py.)
    """
    t = tiny("sd1")
    fine1, fine2 = t.fine_tune(seed=11), t.fine_tune(seed=12)
    b1 = t.model("fine11_permuted13", t.permuted(fine1, seed=13))
    b2 = t.model("fine12_permuted13", t.permuted(fine2, seed=13))
    ref_node = sd_mecha.weighted_sum(
        t.model("ref", t.ref), t.model("fine14", t.fine_tune(seed=14)), alpha=0.5
    )
    out = t.merge(
        sd_mecha.weighted_sum(ref_node, rebasin(sd_mecha.weighted_sum(b1, b2), ref_node), alpha=0.3)
    )
    aligned = sd_mecha.weighted_sum(t.model("fine11", fine1), t.model("fine12", fine2))
    assert_same(out, t.merge(sd_mecha.weighted_sum(ref_node, aligned, alpha=0.3)))


# ---------------------------------------------------------------------------------------------
# Keys, errors, events, caching


def test_keys_outside_the_spec_pass_through_and_keys_missing_in_ref_are_still_permuted(tiny, monkeypatch):
    """Also: an EMA copy of a UNet weight is permuted like that weight. Bound keys are handed out
    from the pre-pass's permuted copy of `a`: only the EMA copy is read and permuted again."""
    from sd_mecha_rebasin.mecha import merge_method

    streamed: list[str] = []

    def counting_permute(spec, key, value, perms):
        streamed.append(key)
        return permute_tensor(spec, key, value, perms)

    monkeypatch.setattr(merge_method, "permute_tensor", counting_permute)
    t = tiny("sd1")
    fine = t.fine_tune(seed=41)
    b_values = t.permuted(fine, seed=42)
    b_values |= {VAE_KEY: torch.randn(4, 4, 3, 3), EMA_KEY: b_values[EMA_OF].clone()}
    missing = "model.diffusion_model.input_blocks.4.1.proj_out.weight"
    ref_values = {k: v for k, v in t.ref.items() if k != missing}
    out = t.merge(
        rebasin(t.model("fine41_permuted42_vae_ema", b_values), t.model("ref_without_key", ref_values))
    )
    assert not torch.equal(b_values[EMA_OF], fine[EMA_OF])
    assert_same(out, fine | {VAE_KEY: b_values[VAE_KEY], EMA_KEY: fine[EMA_OF]})
    assert streamed == [EMA_OF]  # the EMA key, permuted as the key it copies


def test_sd2_is_detected_without_a_config(tiny):
    t = tiny("sd2")
    ref = t.model("ref", t.ref, config=None)
    b = t.model("ref_permuted", t.permuted(t.ref, seed=1), config=None)
    with sd_mecha.open_graph(b) as graph:
        root = graph.finalize_root(merge_space="weight", check_extra_keys=False, check_mandatory_keys=False)
    assert root.model_config.identifier == "sd2-ldm"
    assert_same(t.merge(sd_mecha.weighted_sum(ref, rebasin(b, ref), alpha=0.5)), t.ref)


def _merge_and_events(t: Tiny, recipe, **kwargs) -> tuple[dict[str, torch.Tensor], list[str]]:
    seen: list[str] = []
    with events.listening(lambda event, data: seen.append(event)):
        out = t.merge(recipe, **kwargs)
    return out, seen


def _prepass_events(t: Tiny, recipe, **kwargs) -> list[str]:
    return _merge_and_events(t, recipe, **kwargs)[1]


@pytest.mark.parametrize(
    ("other", "config"),
    [("sdxl", None), ("sd2", None), ("sd1", "sd1-ldm")],
    ids=["sd1-with-sdxl", "sd1-with-sd2", "same-keys-other-shape"],
)
def test_architecture_mismatch_is_an_error_before_matching(tiny, other, config):
    t = tiny("sd1")
    if other == "sd1":  # same keys, one tensor of another shape
        key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
        values, expected = (
            t.ref | {key: torch.zeros(48, 32, 3, 3)},
            rf"{key}.*\(32, 32, 3, 3\).*\(48, 32, 3, 3\)",
        )
    else:
        values, expected = tiny(other).ref, r"has shape \(.*\) in `a` but \(.*\) in `ref`"
    ref = t.model(f"{other}_odd" if other == "sd1" else f"other_{other}", values, config=config)
    a = t.model("ref", t.ref, config=config)
    seen: list[str] = []
    with pytest.raises(ValueError, match=expected), events.listening(lambda e, d: seen.append(e)):
        t.merge(rebasin(a, ref), threads=1)
    assert "prepass_start" not in seen


def test_parameters_are_checked(tiny):
    t = tiny("sd1")
    ref = t.model("ref", t.ref)
    for kwargs, message in (
        ({"iters": -1}, "iters"),
        ({"threads": -2}, "threads"),
        ({"device": "gpu0"}, "device"),
        ({"precision": "fp16"}, "precision"),
    ):
        with pytest.raises(ValueError, match=message):
            t.merge(rebasin(ref, ref, **kwargs))


def test_one_prepass_per_merge_with_progress_events(tiny, ref_with_its_permuted_copy):
    t = tiny("sd1")
    received = [
        (e, d) for e, d in ref_with_its_permuted_copy[1] if e in ("prepass_start", "sweep", "prepass_end")
    ]
    names = [event for event, _ in received]  # the other events: tests/test_progress.py
    assert names[0] == "prepass_start" and names[-1] == "prepass_end"
    assert names.count("prepass_start") == names.count("prepass_end") == 1
    assert received[0][1] == {"spaces": len(t.spec.spaces), "max_iter": 50}
    result = received[-1][1]["result"]
    assert result.converged and names.count("sweep") == len(result.history) - 1
    assert result.rel_distance == 0.0


def test_an_explicit_cache_keeps_the_permutations_between_merges(tiny):
    t = tiny("sd1")
    ref = t.model("ref", t.ref)
    fine = t.fine_tune(seed=51)
    node = rebasin(t.model("fine51_permuted52", t.permuted(fine, seed=52)), ref)
    cache = {node: node.merge_method.create_cache()}
    recipe = sd_mecha.weighted_sum(ref, node, alpha=0.7)
    assert (
        _prepass_events(t, sd_mecha.weighted_sum(ref, node, alpha=0.3), cache=cache).count("prepass_start")
        == 1
    )
    out, seen = _merge_and_events(t, recipe, cache=cache)
    assert "prepass_start" not in seen
    assert_same(out, t.merge(sd_mecha.weighted_sum(ref, t.model("fine51", fine), alpha=0.7)))
    # without the cache, every merge runs its own pre-pass: nothing else is kept between merges
    assert _prepass_events(t, recipe).count("prepass_start") == 1


# ---------------------------------------------------------------------------------------------
# Serialization


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,  # a hang only
    )


def test_serialized_recipe_merges_bit_identically_in_a_fresh_process(one_thread_merge, tmp_path):
    recipe, expected = one_thread_merge
    text = sd_mecha.serialize(recipe, finalize=False)  # finalizing would want the VAE keys
    assert 'merge "git_rebasin"' in text
    recipe_path = tmp_path / "recipe.mecha"
    recipe_path.write_text(text)

    # One fresh process for both checks (its imports cost seconds): first without the import, where
    # sd-mecha does not know the method and its message names it; then with it, the merge.
    out = tmp_path / "out.safetensors"
    done = _run_python(f"""
        import pathlib, traceback, torch, sd_mecha
        torch.set_num_threads(1)
        path = pathlib.Path({str(recipe_path)!r})
        try:
            sd_mecha.deserialize_path(path)
        except Exception:
            print("without the import:", traceback.format_exc())
        else:
            print("without the import: deserialized")
        print("end of the check without the import")
        import sd_mecha_rebasin
        from support import tiny_merge
        from support.layouts import arch_overrides
        from sd_mecha_rebasin.mecha.merge_method import arch_override
        recipe = sd_mecha.deserialize_path(path)
        with arch_override("sd1-ldm", arch_overrides("sd1", "tiny")):
            tiny_merge.merge(recipe, output={str(out)!r}, output_dtype=torch.float32, threads=0)
    """)
    assert done.returncode == 0, done.stderr
    without_import = done.stdout.split("end of the check without the import")[0]
    assert "without the import: deserialized" not in without_import
    assert "unknown merge method: 'git_rebasin'" in without_import
    assert_same(load_file(str(out)), expected)


@pytest.mark.parametrize("narrow", [torch.float16, torch.bfloat16])
def test_compact_keeps_values_exactly_across_chunks(monkeypatch, narrow):
    from sd_mecha_rebasin.mecha import merge_method

    monkeypatch.setattr(merge_method, "COMPACT_CHUNK", 7)  # many chunks, the last one ragged
    scale = 1e6 if narrow == torch.bfloat16 else 1.0  # beyond fp16's range: only bf16 holds them
    values = (torch.randn(5, 9) * scale).to(narrow).float()
    compact = merge_method._compact(values)
    assert compact.dtype == narrow and compact.shape == values.shape
    assert torch.equal(compact.float(), values)
    # One value that neither fp16 nor bf16 holds, in the last chunk: the tensor stays float32.
    values[-1, -1] = 1.0 + 2.0**-20
    kept = merge_method._compact(values)
    assert kept.dtype == torch.float32 and torch.equal(kept, values)
    # A private copy (matching permutes `a`'s in place) never shares sd-mecha's tensor; `ref`'s may.
    assert kept.data_ptr() != values.data_ptr()
    assert merge_method._compact(values, private=False).data_ptr() == values.data_ptr()
    half = values.half()
    assert merge_method._compact(half).data_ptr() != half.data_ptr()
    assert merge_method._compact(half, private=False).data_ptr() == half.data_ptr()
