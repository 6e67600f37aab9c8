"""The warm start's unit features really are invariant to every other permutation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.layouts import arch_overrides, key_shapes, random_state_dict

from sd_mecha_rebasin import apply_permutation, permutation_spec, random_permutation
from sd_mecha_rebasin.permutations.spec import identity_permutation, invert
from sd_mecha_rebasin.search import warm_start

FAMILIES = {"sd1": "sd1-ldm", "sd2": "sd2-ldm", "sdxl": "sdxl-sgm"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request):
    shapes = key_shapes(request.param, "tiny")
    spec = permutation_spec(
        FAMILIES[request.param], arch=arch_overrides(request.param, "tiny"), shapes=shapes
    )
    return spec, random_state_dict(shapes, seed=5)


def test_features_follow_only_their_own_space(case):
    """Features of the permuted model at unit u are the original's at the unit moved there."""
    spec, model = case
    perms = random_permutation(spec, seed=3)
    permuted = apply_permutation(spec, perms, model)
    checked = 0
    for key, axes in spec.axes.items():
        features_before = warm_start.key_features(spec, key, model[key])
        features_after = warm_start.key_features(spec, key, permuted[key])
        for axis, segments in axes.items():
            for seg in segments:
                units = slice(seg.start, seg.start + len(seg.units))
                before, after = features_before[axis][units], features_after[axis][units]
                # Within the segment, position i of the permuted model holds unit perm[units[i]].
                position = {int(u): i for i, u in enumerate(seg.units)}
                source = [position[int(perms[seg.space][u])] for u in seg.units]
                torch.testing.assert_close(after, before[source], rtol=1e-5, atol=1e-6)
                checked += 1
    assert checked > 50


def test_features_pool_long_unpermuted_axes(case, monkeypatch):
    spec, model = case
    monkeypatch.setattr(warm_start, "MAX_POSITIONS", 4)
    widths = set()
    for key in spec.axes:
        widths |= {features.shape[1] for features in warm_start.key_features(spec, key, model[key]).values()}
    assert max(widths) <= 8  # mean and mean square at <= 4 pooled positions each


def test_start_from_features_recovers_a_permuted_copy(case):
    spec, model = case
    hidden = random_permutation(spec, seed=8)
    start = warm_start.invariant_feature_start(
        spec, model, apply_permutation(spec, hidden, model), identity_permutation(spec), threads=1
    )
    expected = invert(hidden)
    assert all(np.array_equal(start[n], expected[n]) for n in spec.spaces)


def axis_features_read_alone(spec, key, value: torch.Tensor, axis: int) -> torch.Tensor:
    """Reference: one axis's features from a whole float32 copy of that axis's slices."""
    slices = value.movedim(axis, 0).float()
    others = [other + 1 if other < axis else other for other in spec.axes[key] if other != axis]
    mean = slices.mean(dim=others) if others else slices
    mean_square = slices.square().mean(dim=others) if others else slices.square()
    return warm_start._pooled(mean.reshape(len(slices), -1), mean_square.reshape(len(slices), -1))


def test_one_pass_features_equal_each_axis_read_on_its_own(case, monkeypatch):
    """The fused pass (chunks of the first permuted axis, other axes summed across chunks)."""
    spec, model = case
    monkeypatch.setattr(warm_start, "ROWS_PER_CHUNK_ELEMENTS", 50)  # many chunks per tensor
    fused = led_by_inner_axis = 0
    for key, axes in spec.axes.items():
        features = warm_start.key_features(spec, key, model[key])
        assert sorted(features) == sorted(axes)
        for axis in axes:
            alone = axis_features_read_alone(spec, key, model[key], axis)
            torch.testing.assert_close(features[axis], alone, rtol=1e-5, atol=1e-6)
            fused += axis != min(axes)
        led_by_inner_axis += min(axes) != 0
    assert fused > 20  # axes whose features came from sums across chunks
    assert led_by_inner_axis > 0  # keys whose axis 0 is a position axis (token embeddings)
