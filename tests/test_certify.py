"""The identity certificate (search/certify.py): MergeMany gives the full search's answer, bit for bit.

Every case runs `merge_many` twice, with the certificate (the default) and with `full_search=True`
(weight matching's products for every alignment), and compares the permutations, the pass
objectives, every alignment's report and the output. The adversarial cases build inputs where a
bound must not clear (near-ties, dead units, a swap among fine-tunes, fp16 rounding at the margin)
and check the space was left to exact rows or to the full product, never to the bound alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.layouts import random_state_dict
from test_many import FAMILIES, Case, N, add_noise, as_dtype, same_perms, shared_basis, tiny_spec

from sd_mecha_rebasin import (
    apply_permutation,
    merge_many,
    merged_tensors,
    permutation_spec,
    random_permutation,
)
from sd_mecha_rebasin.common.devices import product_device
from sd_mecha_rebasin.common.workers import worker_pool
from sd_mecha_rebasin.permutations import groups
from sd_mecha_rebasin.permutations.spec import identity_permutation
from sd_mecha_rebasin.search import certify
from sd_mecha_rebasin.search.certify import PassCentre
from sd_mecha_rebasin.search.matching import _solve

STEP_FIELDS = ("pass_index", "position", "visits", "model", "gain", "distance", "changed", "sweeps")
STEP_FIELDS += ("units_moved", "units", "distance_before", "zero_weight")


def both(spec, models, **kwargs):
    """(default, full search), asserted identical in everything but timings and the decided counts."""
    fast = merge_many(spec, models, threads=1, **kwargs)
    full = merge_many(spec, models, threads=1, full_search=True, **kwargs)
    assert all(same_perms(p, q) for p, q in zip(fast.perms, full.perms))
    assert [h.objective for h in fast.history] == [h.objective for h in full.history]
    assert [(h.models_changed, h.permutations_changed, h.sweeps, h.unmoved) for h in fast.history] == [
        (h.models_changed, h.permutations_changed, h.sweeps, h.unmoved) for h in full.history
    ]
    for a, b in zip(fast.steps, full.steps, strict=True):
        assert [getattr(a, f) for f in STEP_FIELDS] == [getattr(b, f) for f in STEP_FIELDS]
    assert (fast.converged, fast.restarted, fast.sum_dtype) == (
        full.converged,
        full.restarted,
        full.sum_dtype,
    )
    assert all(s.certified == s.exact_rows == 0 for s in full.steps)
    keys = [k for k in spec.axes if k in models[fast.ref]][:12]
    for (k, x), (_, y) in zip(
        merged_tensors(spec, models, fast.perms, weights=fast.weights, keys=keys, threads=1),
        merged_tensors(spec, models, full.perms, weights=full.weights, keys=keys, threads=1),
    ):
        assert torch.equal(x, y), k
    return fast, full


def proved(result) -> int:
    return sum(s.certified + s.exact_rows for s in result.steps)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shared_basis_inputs_are_proved_unmoved_and_match_the_full_search(family, dtype):
    spec, models = shared_basis(family)
    fast, _ = both(spec, as_dtype(models, dtype))
    assert fast.equals_weighted_mean and fast.alignments == N
    assert all(s.searched == 0 and s.certified + s.exact_rows == len(spec.spaces) for s in fast.steps)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weights": [0.4, 0.0, 0.2, 0.4]},
        {"ref": 2},
        {"start": "all-others"},
        {"start": "incremental"},
        {"low_memory": True},
        {"max_iter": 0},
        {"precision": "bf16"},
        {"seed": 5, "weights": [1, 2, 3, 4]},
    ],
    ids=["weight0", "ref2", "all-others", "incremental", "low-memory", "iters0", "bf16", "weights"],
)
def test_options_give_the_full_search_answer(kwargs):
    spec, models = shared_basis("sd1")
    fast, _ = both(spec, models, **kwargs)
    if kwargs.get("start") != "incremental" and kwargs.get("max_iter") != 0:
        assert proved(fast) > 0


def test_permuted_inputs_recover_what_the_full_search_recovers():
    c = Case("sd1")
    fast, _ = both(c.spec, c.models)
    assert all(same_perms(fast.perms[i], c.expected(i)) for i in range(N))


@pytest.mark.parametrize("odd", [0, 1, 3])
def test_one_permuted_model_among_fine_tunes(odd):
    spec, models = shared_basis("sd1")
    models[odd] = apply_permutation(spec, random_permutation(spec, seed=77), models[odd])
    fast, _ = both(spec, models)
    assert fast.restarted and not fast.equals_weighted_mean


def test_unet_only_and_fp8_inputs():
    spec, shapes = tiny_spec("sd1")
    unet = {k: s for k, s in shapes.items() if k.startswith("model.diffusion_model.")}
    from test_many import arch_overrides

    unet_spec = permutation_spec("sd1-ldm", arch=arch_overrides("sd1", "tiny"), shapes=unet, text_encoders=())
    base = random_state_dict(unet, seed=11)
    models = [add_noise(base, 0.01, seed=100 + i) for i in range(N)]
    fast, _ = both(unet_spec, models)
    assert fast.equals_weighted_mean and proved(fast) > 0
    _, models = shared_basis("sd1")
    fp8 = [as_dtype([m], d)[0] for m, d in zip(models, (torch.float16, torch.float8_e4m3fn) * 2)]
    fast, _ = both(spec, fp8)
    assert fast.equals_weighted_mean


def test_models_that_differ_far_more_than_fine_tunes():
    """Independent random models: the mean of the others is a blur, nothing is proved by the bound
    where the full search moves something, and both agree."""
    spec, shapes = tiny_spec("sd1")
    models = [random_state_dict(shapes, seed=300 + i) for i in range(N)]
    both(spec, models)


# --- adversarial inputs at the level of one space -------------------------------------------------


def _atom_space(spec, min_size: int = 8) -> str:
    """A space any permutation of which is legal (a free atom), for hand-made swaps."""
    return next(
        name
        for name, space in spec.spaces.items()
        if isinstance(space.tree, groups.Atom) and space.size >= min_size
    )


def _set_unit(spec, sd, space, unit, values_from=None, value=None):
    """Every slice of `space`'s unit in `sd` set to another unit's slices (`values_from`) or `value`."""
    for key, axis, seg in spec.segments_of(space):
        if key not in sd:
            continue
        where = np.flatnonzero(seg.units == unit)
        for j in where:
            dst = sd[key].narrow(axis, seg.start + int(j), 1)
            if values_from is not None:
                src_j = int(np.flatnonzero(seg.units == values_from)[0])
                dst.copy_(sd[key].narrow(axis, seg.start + src_j, 1))
            else:
                dst.fill_(value)


def _decisions(spec, models, i: int, space: str):
    """What the certificate decides for `space` when model i is matched against the mean of the
    others (all in their own bases), and the full solve's gain at the identity there."""
    keys = [k for k in spec.axes if k in models[0]]
    n = len(models)
    total = {k: sum(m[k].float() for m in models) / n for k in keys}
    target = {k: (total[k] * n - models[i][k].float()) / (n - 1) for k in keys}
    model = {k: models[i][k].float() for k in keys}
    with worker_pool(1) as pool:
        how = certify.space_verdict(spec, space, target, model, PassCentre(spec, total, 1.0), pool)
    size = spec.spaces[space].size
    _, gain = _solve(spec, space, target, model, np.arange(size), product_device("cpu"), None, "fp32")
    return (how != certify.SEARCH, how), gain


def test_duplicated_units_are_never_proved_by_the_bound():
    spec, models = shared_basis("sd1")
    space = _atom_space(spec)
    for m in models:  # units 0 and 1 equal in every model: a tie the bound cannot clear
        _set_unit(spec, m, space, 1, values_from=0)
    for i in range(len(models)):
        (ok, how), gain = _decisions(spec, models, i, space)
        assert how != certify.BOUND
        assert not (ok and gain > 0)
    both(spec, models)


def test_dead_units_are_left_to_the_full_solve():
    spec, models = shared_basis("sd1")
    space = _atom_space(spec)
    for m in models:
        for unit in (2, 5):
            _set_unit(spec, m, space, unit, value=0.0)
    (ok, how), gain = _decisions(spec, models, 1, space)
    assert how == certify.SEARCH and not ok and gain == 0
    both(spec, models)


def test_a_legal_swap_of_two_units_in_one_model_is_found():
    spec, models = shared_basis("sd1")
    space = _atom_space(spec)
    swap = identity_permutation(spec)
    swap[space][[3, 4]] = [4, 3]
    models[2] = apply_permutation(spec, swap, models[2])
    (ok, how), gain = _decisions(spec, models, 2, space)
    assert not ok and how == certify.SEARCH and gain > 0
    fast, _ = both(spec, models)
    assert not fast.equals_weighted_mean and fast.restarted


def test_fp16_rounding_at_the_margin_is_not_proved_by_the_bound():
    """Two units one fp16 step apart in a single element: the diagonal beats the other unit by far
    less than the float32 products' error bound, so only exact rows or the full solve may decide."""
    spec, models = shared_basis("sd1")
    models = as_dtype(models, torch.float16)
    space = _atom_space(spec)
    for m in models:
        _set_unit(spec, m, space, 1, values_from=0)
        key, axis, seg = next((k, a, s) for k, a, s in spec.segments_of(space) if k in m)
        j = int(np.flatnonzero(seg.units == 1)[0])
        row = m[key].narrow(axis, seg.start + j, 1).reshape(-1)
        row[0] = torch.nextafter(row[0], torch.tensor(float("inf"), dtype=torch.float16))
    for i in range(len(models)):
        (ok, how), gain = _decisions(spec, as_dtype(models, torch.float32), i, space)
        assert how != certify.BOUND and not (ok and gain > 0)
    both(spec, models)


def test_the_certifier_never_proves_a_space_the_full_solve_moves():
    """Random targets and models near and far: wherever the certifier says "identity", the full
    solve's gain at the identity is 0."""
    spec, shapes = tiny_spec("sd1")
    base = random_state_dict(shapes, seed=3)
    checked = proved_spaces = 0
    for trial, noise in enumerate((0.001, 0.05, 0.3, 1.0)):
        models = [add_noise(base, noise, seed=40 + 10 * trial + i) for i in range(3)]
        if trial == 3:  # and a model under a random legal permutation
            models[1] = apply_permutation(spec, random_permutation(spec, seed=trial), models[1])
        for space in list(spec.spaces)[::3]:
            (ok, _), gain = _decisions(spec, models, 1, space)
            checked += 1
            proved_spaces += ok
            assert not (ok and gain > 0), (noise, space)
    assert 0 < proved_spaces < checked


def test_product_error_grows_with_reduced_precision():
    spec, _ = tiny_spec("sd1")
    space = next(iter(spec.spaces))
    fp32 = certify.product_error(spec, space)
    assert 0 < fp32 < 1e-2
    assert certify.product_error(spec, space, "bf16") > fp32 + 1e-2
    assert certify.product_error(spec, space, "fp32", "cuda") > fp32 + 1e-2
