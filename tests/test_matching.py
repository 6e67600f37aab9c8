"""Weight matching recovers permutations exactly, never lowers the objective, ignores thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.layouts import arch_overrides, key_shapes, random_state_dict

from sd_mecha_rebasin import apply_permutation, permutation_spec, random_permutation, weight_matching
from sd_mecha_rebasin.common.devices import CPU_STAND_IN, ProductDevice, product_device
from sd_mecha_rebasin.permutations.spec import identity_permutation, invert, permute_tensor
from sd_mecha_rebasin.search import matching
from sd_mecha_rebasin.search.warm_start import invariant_feature_start

FAMILIES = {"sd1": "sd1-ldm", "sd2": "sd2-ldm", "sdxl": "sdxl-sgm"}


def tiny_spec(family: str):
    shapes = key_shapes(family, "tiny")
    return permutation_spec(FAMILIES[family], arch=arch_overrides(family, "tiny"), shapes=shapes), shapes


def add_noise(sd: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """Fine-tune-like noise: `scale` times each tensor's std."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.numel() > 1:
            out[k] = v + scale * v.std() * torch.randn(v.shape, generator=g, dtype=v.dtype)
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request):
    family = request.param
    spec, shapes = tiny_spec(family)
    ref = random_state_dict(shapes, seed=11)
    hidden = random_permutation(spec, seed=7)
    model = apply_permutation(spec, hidden, ref)
    return family, spec, ref, hidden, model


@pytest.mark.parametrize("warm_start", [False, True], ids=["from-identity", "warm-start"])
def test_recovers_a_random_permutation_exactly(case, warm_start):
    _, spec, ref, hidden, model = case
    result = weight_matching(spec, ref, model, seed=0, threads=1, warm_start=warm_start)
    assert result.converged
    aligned = apply_permutation(spec, result.perms, model)
    assert max((aligned[k] - ref[k]).abs().max().item() for k in ref) == 0.0
    assert result.rel_distance == 0.0
    expected = invert(hidden)
    assert sum(not np.array_equal(result.perms[n], expected[n]) for n in spec.spaces) == 0


@pytest.mark.parametrize(
    "warm_start, precision",
    [(False, "fp32"), (True, "fp32"), (False, "bf16")],
    ids=["identity", "warm", "bf16"],
)
def test_recovers_under_fine_tune_noise(case, warm_start, precision):
    _, spec, ref, hidden, model = case
    noisy = add_noise(model, 0.01, seed=3)
    result = weight_matching(spec, ref, noisy, seed=0, threads=1, warm_start=warm_start, precision=precision)
    expected = invert(hidden)
    wrong = [n for n in spec.spaces if not np.array_equal(result.perms[n], expected[n])]
    assert wrong == []
    assert result.rel_distance <= 0.02
    assert result.history[0].rel_distance <= 1.0


def test_objective_never_decreases(case):
    _, spec, ref, _, model = case
    noisy = add_noise(model, 0.5, seed=4)  # a weakly related pair: many sweeps, many changes
    # Runs are deterministic, so the run stopped after k sweeps shows the state after sweep k; its
    # objective is recomputed from the tensors, independently of the gains the solver tracked.
    exact = []
    for sweeps in range(0, 5):
        result = weight_matching(spec, ref, noisy, seed=1, threads=1, max_iter=sweeps, warm_start=False)
        exact.append(result.objective)
        tracked = [s.objective for s in result.history]
        assert all(after >= before for before, after in zip(tracked, tracked[1:]))
        assert result.objective == pytest.approx(tracked[-1], rel=1e-6)
    for before, after in zip(exact, exact[1:]):
        assert after >= before - 1e-7 * abs(before)  # float32 rounding of the recomputation
    assert exact[-1] > exact[0]


def test_thread_count_does_not_change_the_result(case):
    _, spec, ref, _, model = case
    noisy = add_noise(model, 0.3, seed=5)
    one = weight_matching(spec, ref, noisy, seed=2, threads=1, max_iter=3)
    two = weight_matching(spec, ref, noisy, seed=2, threads=2, max_iter=3)
    assert len(one.history) > 2  # the pair is hard enough to need several sweeps
    assert all(np.array_equal(one.perms[n], two.perms[n]) for n in spec.spaces)
    assert [s.objective for s in one.history] == [s.objective for s in two.history]


def test_half_precision_inputs_give_the_same_permutations():
    spec, shapes = tiny_spec("sd1")
    ref = random_state_dict(shapes, seed=2)
    hidden = random_permutation(spec, seed=9)
    noisy = add_noise(apply_permutation(spec, hidden, ref), 0.01, seed=1)
    half = {k: v.half() for k, v in noisy.items()}
    result = weight_matching(spec, {k: v.half() for k, v in ref.items()}, half, threads=1)
    expected = invert(hidden)
    assert all(np.array_equal(result.perms[n], expected[n]) for n in spec.spaces)


def test_scipy_and_lapx_solvers_find_the_same_permutations():
    spec, shapes = tiny_spec("sd1")
    ref = random_state_dict(shapes, seed=3)
    noisy = add_noise(apply_permutation(spec, random_permutation(spec, 1), ref), 0.2, seed=2)
    fast = weight_matching(spec, ref, noisy, solver="lapx", max_iter=5, threads=1)
    slow = weight_matching(spec, ref, noisy, solver="scipy", max_iter=5, threads=1)
    assert all(np.array_equal(fast.perms[n], slow.perms[n]) for n in spec.spaces)


def test_warm_start_alone_recovers_an_exact_copy(case):
    _, spec, ref, hidden, model = case
    start = invariant_feature_start(spec, ref, model, identity_permutation(spec), threads=1)
    expected = invert(hidden)
    assert [n for n in spec.spaces if not np.array_equal(start[n], expected[n])] == []


def test_warm_start_is_kept_only_when_it_beats_the_start(case):
    _, spec, ref, hidden, model = case
    # Starting from the answer, a warm start can only tie it: the answer stays and one sweep confirms it.
    result = weight_matching(spec, ref, model, init=invert(hidden), threads=1)
    assert result.history[0].rel_distance == 0.0 and len(result.history) == 2 and result.converged


def test_matching_leaves_its_inputs_untouched(case):
    _, spec, ref, _, model = case
    noisy = add_noise(model, 0.2, seed=6)
    before = {k: v.clone() for k, v in noisy.items()}, {k: v.clone() for k, v in ref.items()}
    weight_matching(spec, ref, noisy, threads=1, max_iter=2)
    assert all(torch.equal(noisy[k], before[0][k]) for k in noisy)
    assert all(torch.equal(ref[k], before[1][k]) for k in ref)


def reference_cost(spec, space, ref, model, perms):
    """The cost matrix straight from the definition: whole tensors, float64."""
    n = spec.spaces[space].size
    cost = torch.zeros(n, n, dtype=torch.float64)
    others = {name: p for name, p in perms.items() if name != space}
    for key in spec.keys_of(space):
        b_full = permute_tensor(spec, key, model[key], others)
        for axis, segments in spec.axes[key].items():
            for seg in segments:
                if seg.space == space:
                    m = len(seg.units)
                    a = ref[key].narrow(axis, seg.start, m).movedim(axis, 0).reshape(m, -1).double()
                    b = b_full.narrow(axis, seg.start, m).movedim(axis, 0).reshape(m, -1).double()
                    units = torch.from_numpy(seg.units)
                    cost[units[:, None], units[None, :]] += a @ b.T
    return cost.numpy()


@pytest.mark.parametrize("device", [product_device("cpu"), CPU_STAND_IN], ids=["cpu", "device-path-on-cpu"])
def test_chunked_products_match_the_definition(case, monkeypatch, device):
    _, spec, ref, hidden, model = case
    noisy = add_noise(model, 0.3, seed=8)
    perms = random_permutation(spec, seed=4)
    monkeypatch.setattr(matching, "CHUNK_ELEMENTS", 1000)  # several ragged chunks per tensor
    aligned = apply_permutation(spec, perms, noisy)
    for space in sorted(spec.spaces):
        # On the aligned model the products give C[:, applied]: columns in the space's current order.
        expected = reference_cost(spec, space, ref, noisy, perms)[:, perms[space]]
        got = matching._cost_matrix(spec, space, ref, aligned, perms[space], device)
        scale = np.abs(expected).max()
        assert np.abs(got - expected).max() <= 1e-5 * scale, space
    dot, sq = matching.objective_and_distance(spec, ref, noisy, perms)
    assert dot == pytest.approx(
        sum(float((ref[k].double() * aligned[k].double()).sum()) for k in spec.axes), rel=1e-6
    )
    assert sq == pytest.approx(
        sum(float((ref[k].double() - aligned[k].double()).square().sum()) for k in spec.axes), rel=1e-6
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_device_path_gives_the_cpu_result_bit_for_bit(case, monkeypatch, precision):
    """`--device cuda`'s code (operands copied to the device, cost matrices built there and copied
    back, assignments on CPU threads) with the CPU standing in for the GPU: only CUDA's own calls
    are not run. The same permutations and the same objective after every sweep as the CPU path."""
    _, spec, ref, _, model = case
    noisy = add_noise(model, 0.3, seed=5)  # several sweeps with many changes
    buffers: list[str] = []
    real_scratch = matching.scratch

    def spy(name, shape, dtype):
        buffers.append(name)
        return real_scratch(name, shape, dtype)

    monkeypatch.setattr(matching, "scratch", spy)
    cpu = weight_matching(spec, ref, noisy, seed=2, threads=2, max_iter=4, precision=precision)
    assert "cost" in buffers  # the CPU path accumulates in its reused buffer ...
    buffers.clear()
    stand_in = weight_matching(
        spec, ref, noisy, seed=2, threads=2, max_iter=4, precision=precision, device=CPU_STAND_IN
    )
    assert "cost" not in buffers and "cost64" in buffers  # ... the device path on the device, copied back
    assert len(cpu.history) > 2
    assert all(np.array_equal(cpu.perms[n], stand_in.perms[n]) for n in spec.spaces)
    assert [(s.objective, s.changed, s.rel_distance) for s in cpu.history] == [
        (s.objective, s.changed, s.rel_distance) for s in stand_in.history
    ]
    assert (cpu.objective, cpu.rel_distance) == (stand_in.objective, stand_in.rel_distance)


def test_cuda_resolves_to_the_stand_in_only_when_asked():
    from sd_mecha_rebasin.common.devices import cpu_standing_in_for_cuda, cuda_devices

    assert product_device("cpu").offload is False
    assert product_device("cuda") == ProductDevice(torch.device("cuda"), offload=True)
    with cpu_standing_in_for_cuda():
        assert product_device("cuda:1") is CPU_STAND_IN and cuda_devices() == 1
        assert product_device("cpu").offload is False
    assert product_device("cuda").device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_products_recover_what_the_cpu_recovers(case):
    _, spec, ref, hidden, model = case
    noisy = add_noise(model, 0.01, seed=3)
    expected = invert(hidden)
    for device in ("cpu", "cuda"):
        result = weight_matching(spec, ref, noisy, seed=0, threads=2, device=device)
        assert [n for n in spec.spaces if not np.array_equal(result.perms[n], expected[n])] == [], device


def test_unknown_precision_is_refused():
    spec, shapes = tiny_spec("sd1")
    ref = random_state_dict(shapes, seed=3)
    with pytest.raises(ValueError, match="precision"):
        weight_matching(spec, ref, ref, precision="fp16")


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool]
)
def test_take_along_matches_index_select_bit_for_bit(dtype):
    """The numpy gather behind every permutation gives torch's result for any dtype, never a view."""
    from sd_mecha_rebasin.permutations.spec import take_along

    gen = torch.Generator().manual_seed(3)
    values = (torch.randn(6, 5, 3, 2, generator=gen) * 100).to(dtype)
    for source in (values, values.transpose(0, 1)):  # contiguous and not
        for axes in ([0], [1], [2], [0, 1], [1, 3], [0, 1, 2, 3]):
            indices = {axis: torch.randperm(source.shape[axis], generator=gen) for axis in axes}
            expected = source
            for axis, index in indices.items():
                expected = expected.index_select(axis, index)
            out = take_along(source, indices)
            assert out.dtype == dtype and out.shape == expected.shape
            assert torch.equal(out, expected)
            assert out.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
    rows = torch.tensor([4, 4, 0])  # a partial row index (a chunk of rows) is allowed
    assert torch.equal(take_along(values, {0: rows}), values[rows])
