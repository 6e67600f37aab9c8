"""The MergeMany recipes (recipes/merge_many.py, recipes/ties_many.py) and their `.mecha` files, on tiny SD1 models.

As in test_recipes.py: every model but the first is a legal random permutation of a fine-tune of
`ref`, so re-basin must give what the same recipe gives on the un-permuted fine-tunes.
"""

from __future__ import annotations

import sd_mecha
import torch
from safetensors.torch import load_file
from support.layouts import arch_overrides
from test_merge_method import _one_torch_thread, assert_same, tiny  # noqa: F401  (fixtures)
from test_recipes import TIES_MODELS, merge, merge_mecha, models, ties_expected  # noqa: F401  (fixture)

from sd_mecha_rebasin.mecha.merge_method import arch_override


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_merge_many_mecha_is_the_mean_of_the_rebased_models(models):  # noqa: F811
    m = models("M2 M3", M1=None, M2=2, M3=3)
    assert_close(merge_mecha("merge_many"), merge(sd_mecha.n_average(m["M1"], m["M2"], m["M3"])))


def test_merge_many_script_with_weights(models):  # noqa: F811
    import merge_many  # recipes/, on sys.path through test_recipes

    m = models("M2 M3", M1=None, M2=2, M3=3)
    with arch_override("sd1-ldm", arch_overrides("sd1", "tiny")):
        merge_many.main(
            [
                "M1.safetensors",
                "M2.safetensors",
                "M3.safetensors",
                "out.safetensors",
                "--weights",
                "2,1,1",
                "--dtype",
                "fp32",
                "--threads",
                "2",
            ]
        )
    expected = merge(
        sd_mecha.weighted_sum(sd_mecha.weighted_sum(m["M2"], m["M3"], alpha=0.5), m["M1"], alpha=0.5)
    )
    assert_close(load_file("out.safetensors"), expected)


def test_ties_over_mergemany_task_vectors(models):  # noqa: F811
    m = models(**TIES_MODELS)
    assert_same(merge_mecha("ties_many"), ties_expected(m))
