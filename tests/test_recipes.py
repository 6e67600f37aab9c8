"""The worked examples in recipes/: scripts, recipe functions and `.mecha` files, on tiny SD1 models.

Every model fed to a recipe is a legal random permutation of a fine-tune of `ref`; re-basin undoes
the permutation exactly, so each recipe must give, bit for bit, what the same recipe without
re-basin gives on the un-permuted fine-tunes. That checks chaining with subtract, ties_sum,
add_difference and n_average, and that every `.mecha` file deserializes and merges.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import sd_mecha
import torch
from safetensors.torch import load_file, save_file
from sd_mecha.extensions import merge_methods
from support import tiny_merge
from support.layouts import arch_overrides
from test_merge_method import _one_torch_thread, assert_same, quiet_tqdm, tiny  # noqa: F401  (fixtures)

from sd_mecha_rebasin.mecha.merge_method import arch_override

RECIPES = pathlib.Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

import add_difference_rebasin  # noqa: E402
import rebasin_average  # noqa: E402
import write_mecha  # noqa: E402

add_difference = merge_methods.resolve("add_difference")


def merge(recipe) -> dict[str, torch.Tensor]:
    with arch_override("sd1-ldm", arch_overrides("sd1", "tiny")):
        out = tiny_merge.merge(recipe, output_dtype=torch.float32, tqdm=quiet_tqdm)
    out.pop("__metadata__", None)
    return out


@pytest.fixture
def models(tiny, tmp_path, monkeypatch):  # noqa: F811  (the imported fixture)
    """Write tiny models under the given names in a fresh working directory; return the
    un-permuted originals as sd-mecha models (for the expected results)."""
    t = tiny("sd1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aligned").mkdir()

    def write(permuted: str, **named_seeds: int | None) -> dict[str, object]:
        """name=seed: the fine-tune with that seed (None: ref itself), stored permuted if `name` is
        in `permuted` (one permutation per name)."""
        aligned = {}
        for name, seed in named_seeds.items():
            values = t.ref if seed is None else t.fine_tune(seed)
            stored = t.permuted(values, seed=100 + len(aligned)) if name in permuted.split() else values
            save_file(stored, f"{name}.safetensors")
            save_file(values, f"aligned/{name}.safetensors")
            aligned[name] = sd_mecha.model(tmp_path / "aligned" / f"{name}.safetensors")
        return aligned

    return write


TIES_MODELS = {"permuted": "M1 M2 M3", "base": None, "M1": 1, "M2": 2, "M3": 3}
"""The inputs of ties_rebasin.mecha here and of ties_many.mecha in test_recipes_many.py."""

_ties_expected: list[dict[str, torch.Tensor]] = []


def ties_expected(m: dict[str, object]) -> dict[str, torch.Tensor]:
    """ties_sum of the un-permuted TIES_MODELS task vectors added to base: one sd-mecha merge per process
    for the two test files (the inputs are the same tensors, whichever folder `models` wrote them to)."""
    if not _ties_expected:
        deltas = [m[name] - m["base"] for name in ("M1", "M2", "M3")]
        _ties_expected.append(merge(add_difference(m["base"], sd_mecha.ties_sum(*deltas, k=0.2), alpha=1.0)))
    return _ties_expected[0]


def merge_mecha(stem: str) -> dict[str, torch.Tensor]:
    text = (RECIPES / f"{stem}.mecha").read_text()
    return merge(sd_mecha.deserialize(text))


def test_mecha_files_are_what_the_recipe_functions_serialize():
    for stem in write_mecha.RECIPES:
        assert (RECIPES / f"{stem}.mecha").read_text() == write_mecha.mecha_text(stem), (
            f"run recipes/write_mecha.py ({stem})"
        )


def test_rebasin_average_script(models):
    m = models("B", A=None, B=1)
    with arch_override("sd1-ldm", arch_overrides("sd1", "tiny")):
        rebasin_average.main(
            ["A.safetensors", "B.safetensors", "out.safetensors", "--alpha", "0.3", "--dtype", "fp32"]
        )
    expected = merge(sd_mecha.weighted_sum(m["A"], m["B"], alpha=0.3))
    assert_same(load_file("out.safetensors"), expected)


def test_rebasin_average_mecha(models):
    m = models("B", A=None, B=1)
    assert_same(merge_mecha("rebasin_average"), merge(sd_mecha.weighted_sum(m["A"], m["B"], alpha=0.5)))


def test_ties_on_rebased_task_vectors(models):
    m = models(**TIES_MODELS)
    assert_same(merge_mecha("ties_rebasin"), ties_expected(m))


def test_add_difference_across_basins(models):
    m = models("A", A=1, B=2, C=None)
    expected = merge(add_difference(m["A"], m["B"] - m["C"], alpha=1.0))
    assert_same(merge_mecha("add_difference_rebasin"), expected)
    # the function, with another alpha, and inputs given as paths
    out = merge(add_difference_rebasin.recipe("A.safetensors", "B.safetensors", "C.safetensors", alpha=0.5))
    assert_same(out, merge(add_difference(m["A"], m["B"] - m["C"], alpha=0.5)))


def test_three_models_aligned_to_one_reference(models):
    m = models("M1 M2 M3", ref=None, M1=1, M2=2, M3=3)
    expected = merge(sd_mecha.n_average(m["ref"], m["M1"], m["M2"], m["M3"]))
    assert_same(merge_mecha("align_many"), expected)
