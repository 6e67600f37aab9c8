"""MergeMany (Git Re-Basin, Algorithm 3) on tiny models of every layout: recovery, quality, invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from support.layouts import arch_overrides, key_shapes, random_state_dict

from sd_mecha_rebasin import (
    apply_permutation,
    merge_many,
    merged_tensors,
    permutation_spec,
    random_permutation,
    weight_matching,
)
from sd_mecha_rebasin.files.checkpoint import detect_family, open_checkpoint
from sd_mecha_rebasin.files.lazy import FileStateDict
from sd_mecha_rebasin.permutations.spec import identity_permutation, invert
from sd_mecha_rebasin.search.many import compose, running_sum_dtype

FAMILIES = {"sd1": "sd1-ldm", "sd2": "sd2-ldm", "sdxl": "sdxl-sgm"}
N = 4
NOISE = 0.01


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


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys))


def same_perms(p, q) -> bool:
    return p.keys() == q.keys() and all(np.array_equal(p[n], q[n]) for n in p)


def pairwise_objective(spec, models, perms, weights) -> float:
    """The paper's objective from the permutations: sum_{i<j} w_i w_j <pi_i M_i, pi_j M_j> (float64)."""
    keys = [k for k in spec.axes if k in models[0]]
    aligned = [apply_permutation(spec, p, {k: m[k] for k in keys}) for p, m in zip(perms, models)]
    n = len(models)
    return sum(
        weights[i]
        * weights[j]
        * sum(float((aligned[i][k].double() * aligned[j][k].double()).sum()) for k in keys)
        for i in range(n)
        for j in range(i + 1, n)
    )


class Case:
    """N models: model i = hidden_i(base + noise_i), every hidden_i a different random legal permutation."""

    def __init__(self, family: str, n: int = N, noise: float = NOISE):
        self.family = family
        self.spec, self.shapes = tiny_spec(family)
        self.base = random_state_dict(self.shapes, seed=11)
        self.noisy = [add_noise(self.base, noise, seed=100 + i) for i in range(n)]
        self.hidden = [random_permutation(self.spec, seed=7 + i) for i in range(n)]
        self.models = [apply_permutation(self.spec, h, sd) for h, sd in zip(self.hidden, self.noisy)]
        self.keys = [k for k in self.spec.axes if k in self.base]

    def expected(self, i: int, ref: int = 0):
        """The permutation that takes model i into model `ref`'s basis."""
        return compose(invert(self.hidden[i]), self.hidden[ref])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request):
    c = Case(request.param)
    c.result = merge_many(c.spec, c.models, threads=1)
    return c


def test_recovers_every_permutation_relative_to_the_reference(case):
    assert case.result.converged
    assert len(case.result.perms) == N
    for i in range(N):
        wrong = [
            n for n in case.spec.spaces if not np.array_equal(case.result.perms[i][n], case.expected(i)[n])
        ]
        assert not wrong, f"model {i}: {len(wrong)} permutations not recovered, e.g. {wrong[0]}"


def test_reference_permutation_is_the_identity(case):
    for name, p in case.result.perms[0].items():
        assert np.array_equal(p, np.arange(len(p))), name


def test_merge_is_the_base_up_to_the_averaged_noise(case):
    spec, keys = case.spec, case.keys
    merged = dict(merged_tensors(spec, case.models, case.result.perms, keys=keys, threads=1))
    in_ref_basis = apply_permutation(spec, case.hidden[0], case.base)
    mean_noisy = {k: sum(sd[k] for sd in case.noisy) / N for k in keys}
    ideal = distance(apply_permutation(spec, case.hidden[0], mean_noisy), in_ref_basis, keys)
    ours = distance(merged, in_ref_basis, keys)
    plain = distance({k: sum(m[k] for m in case.models) / N for k in keys}, in_ref_basis, keys)
    assert ideal > 0
    assert ours <= 1.01 * ideal, (ours, ideal)
    assert plain > 20 * ideal, (plain, ideal)


def test_output_pass_matches_the_definition(case):
    spec = case.spec
    weights = [0.4, 0.1, 0.2, 0.3]
    keys = case.keys[:7] + [k for k in case.base if k not in spec.axes][:3]
    got = dict(merged_tensors(spec, case.models, case.result.perms, weights=weights, keys=keys, threads=1))
    assert list(got) == keys
    for k in keys:
        want = sum(
            w * apply_permutation(spec, p, {k: m[k]})[k]
            for w, p, m in zip(weights, case.result.perms, case.models)
        )
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-6)


def test_objective_never_decreases_and_matches_its_definition():
    """Unrelated models (no hidden optimum): several passes move; each pass's objective >= the last."""
    spec, shapes = tiny_spec("sd1")
    models = [random_state_dict(shapes, seed=300 + i) for i in range(N)]
    weights = [0.4, 0.3, 0.2, 0.1]
    steps = []
    result = merge_many(
        spec, models, weights=weights, threads=1, max_iter=2, max_passes=3, on_progress=steps.append
    )
    objectives = [s.objective for s in result.history]
    assert len(objectives) >= 2
    assert result.history[1].models_changed > 0  # the second pass really moved models
    for before, after in zip(objectives, objectives[1:]):
        assert after >= before - 1e-9 * abs(before), objectives
    assert objectives[-1] > objectives[0]
    pairwise = pairwise_objective(spec, models, result.perms, weights)
    assert objectives[-1] == pytest.approx(pairwise, rel=1e-5)
    gains = [s.gain for s in steps if hasattr(s, "gain")]
    assert all(g >= -1e-9 * abs(objectives[-1]) for g in gains)
    assert gains[0] > 0  # a first visit counts from the model's own basis


def test_threads_one_and_two_give_identical_results():
    spec, shapes = tiny_spec("sd1")
    models = [random_state_dict(shapes, seed=400 + i) for i in range(3)]
    one = merge_many(spec, models, threads=1, max_iter=2, max_passes=2)
    two = merge_many(spec, models, threads=2, max_iter=2, max_passes=2)
    assert all(same_perms(p, q) for p, q in zip(one.perms, two.perms))
    assert [s.models_changed for s in one.history] == [s.models_changed for s in two.history]
    assert [s.objective for s in one.history] == pytest.approx([s.objective for s in two.history], rel=1e-9)


def test_same_permutations_whatever_the_order_of_the_other_inputs():
    c = Case("sd1")
    base = merge_many(c.spec, c.models, threads=1, seed=3)
    order = [0, 2, 3, 1]
    shuffled = merge_many(c.spec, [c.models[i] for i in order], threads=1, seed=3)
    for position, i in enumerate(order):
        assert same_perms(shuffled.perms[position], base.perms[i])


@pytest.mark.parametrize("noise", [0.01, 1.0], ids=["related", "unrelated"])
def test_two_models_give_the_pair_merge(noise):
    c = Case("sd2", n=2, noise=noise)
    many = merge_many(c.spec, c.models, weights=[0.7, 0.3], threads=1, seed=5)
    pair = weight_matching(c.spec, c.models[0], c.models[1], threads=1, seed=5)
    assert same_perms(many.perms[1], pair.perms)
    assert len(many.history) == 1  # nothing else moved: model 1's target cannot change
    if noise == 0.01:
        assert same_perms(many.perms[1], c.expected(1))


def test_another_reference_puts_the_output_in_its_basis():
    c = Case("sd1", n=3)
    result = merge_many(c.spec, c.models, ref=2, threads=1)
    for i in range(3):
        assert same_perms(result.perms[i], c.expected(i, ref=2))


def test_lazy_files_give_the_same_result(tmp_path):
    c = Case("sd1", n=3)
    lazy = []
    for i, sd in enumerate(c.models):
        path = tmp_path / f"m{i}.safetensors"
        save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, str(path))
        ckpt = open_checkpoint(path)
        detect_family(ckpt)
        lazy.append(FileStateDict(ckpt))
    half = [{k: v.to(torch.float16) for k, v in sd.items()} for sd in c.models]
    from_files = merge_many(c.spec, lazy, threads=1)
    from_dicts = merge_many(c.spec, half, threads=1)
    assert all(same_perms(p, q) for p, q in zip(from_files.perms, from_dicts.perms))
    assert all(same_perms(from_files.perms[i], c.expected(i)) for i in range(3))
    key = c.keys[0]
    assert lazy[1][key].dtype == torch.float16
    assert torch.equal(lazy[1][key], half[1][key])
    lazy[1][key].zero_()  # each read is a fresh tensor: the next read is unchanged
    assert torch.equal(lazy[1][key], half[1][key])
    for key, value in merged_tensors(c.spec, lazy, from_files.perms, keys=c.keys[:3], dtype=torch.float16):
        assert value.dtype == torch.float16
        want = merged_tensors(c.spec, half, from_dicts.perms, keys=[key])
        torch.testing.assert_close(value, next(want)[1].to(torch.float16))


def test_inputs_are_never_changed():
    c = Case("sd1", n=3)
    copies = [{k: v.clone() for k, v in sd.items()} for sd in c.models]
    merge_many(c.spec, c.models, threads=1)
    for sd, copy in zip(c.models, copies):
        assert all(torch.equal(sd[k], copy[k]) for k in sd)


@pytest.mark.parametrize(
    ("n", "kwargs", "message"),
    [
        (1, {}, "at least 2 models, got 1"),
        (3, {"weights": [0.5, 0.5]}, "got 2 weights for 3 models"),
        (3, {"weights": [0.5, -0.1, 0.6]}, "weight 2 is -0.1"),
        (3, {"weights": [0.5, float("nan"), 0.6]}, "weight 2 is nan"),
        (3, {"weights": [0.0, 0.0, 0.0]}, "the weights sum to 0"),
        (3, {"weights": [0.0, 0.5, 0.5]}, "the reference (model 1) has weight 0"),
        (3, {"ref": 3}, "reference index 3 is out of range for 3 models"),
        (3, {"max_passes": 0}, "max_passes must be >= 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(n, kwargs, message):
    spec, shapes = tiny_spec("sd1")
    models = [random_state_dict(shapes, seed=i) for i in range(n)]
    with pytest.raises(ValueError) as info:
        merge_many(spec, models, **kwargs)
    assert message in str(info.value)


def test_a_model_missing_a_permuted_key_is_refused():
    spec, shapes = tiny_spec("sd1")
    models = [random_state_dict(shapes, seed=i) for i in range(2)]
    key = next(iter(spec.axes))
    del models[1][key]
    with pytest.raises(ValueError, match=f"model 2 lacks {key}"):
        merge_many(spec, models)


# --- the running sum at the inputs' precision (16-bit inputs: a 16-bit sum, rebuilt exactly) ---


def as_dtype(models, dtype):
    return [{k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()} for sd in models]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_half_precision_inputs_use_a_half_sum_and_recover_every_permutation(family):
    c = Case(family)
    half = as_dtype(c.models, torch.float16)
    assert running_sum_dtype(half, c.keys) == torch.float16
    events = []
    # the incremental start: the event order and read counts below are its (the sum's dtype is the point)
    compact = merge_many(c.spec, half, threads=1, on_progress=events.append, start="incremental")
    assert compact.converged and compact.sum_dtype == torch.float16
    for i in range(
        N
    ):  # what the float32 sum finds (test_recovers_every_permutation_relative_to_the_reference)
        assert same_perms(compact.perms[i], c.expected(i)), i
    # Pass 1 moved every model: the sum is rebuilt (announced first), pass 2 moved none: it is not.
    kinds = [type(e).__name__ for e in events]
    assert kinds[: N - 1] == ["ModelStep"] * (N - 1) and kinds[N - 1 : N + 1] == ["SumRebuild", "PassStats"]
    assert compact.history[0].rebuild_seconds > 0 and compact.history[-1].rebuild_seconds == 0
    if family == "sd1":  # the pass objectives come from the exact rebuilt sum: a float32 sum's to 1e-6
        wide = merge_many(c.spec, half, threads=1, sum_dtype=torch.float32)
        assert wide.sum_dtype == torch.float32 and all(s.rebuild_seconds == 0 for s in wide.history)
        assert all(same_perms(p, q) for p, q in zip(compact.perms, wide.perms))
        assert [s.objective for s in compact.history] == pytest.approx(
            [s.objective for s in wide.history], rel=1e-6
        )


def test_bfloat16_sum_recovers_every_permutation():
    c = Case("sd1")
    result = merge_many(c.spec, as_dtype(c.models, torch.bfloat16), threads=1)
    assert all(same_perms(result.perms[i], c.expected(i)) for i in range(N))


def test_half_sum_objective_never_decreases_and_matches_its_definition():
    """Unrelated fp16 models, several passes: the objective is exact although S is float16."""
    spec, shapes = tiny_spec("sd1")
    models = as_dtype([random_state_dict(shapes, seed=300 + i) for i in range(N)], torch.float16)
    weights = [0.4, 0.3, 0.2, 0.1]
    result = merge_many(spec, models, weights=weights, threads=1, max_iter=2, max_passes=3)
    objectives = [s.objective for s in result.history]
    assert len(objectives) >= 2 and result.history[1].models_changed > 0
    for before, after in zip(objectives, objectives[1:]):
        assert after >= before - 1e-9 * abs(before), objectives
    pairwise = pairwise_objective(spec, models, result.perms, weights)
    assert objectives[-1] == pytest.approx(pairwise, rel=1e-6)


def test_half_sum_threads_one_and_two_give_identical_results():
    spec, shapes = tiny_spec("sd1")
    models = as_dtype([random_state_dict(shapes, seed=400 + i) for i in range(3)], torch.float16)
    one = merge_many(spec, models, threads=1, max_iter=2, max_passes=2)
    two = merge_many(spec, models, threads=2, max_iter=2, max_passes=2)
    assert all(same_perms(p, q) for p, q in zip(one.perms, two.perms))
    assert [s.objective for s in one.history] == [s.objective for s in two.history]


def test_running_sum_dtype_follows_the_inputs(tmp_path):
    spec, shapes = tiny_spec("sd1")
    sd = random_state_dict(shapes, seed=1)
    keys = [k for k in spec.axes if k in sd]
    fp16, bf16, fp8 = (as_dtype([sd], d)[0] for d in (torch.float16, torch.bfloat16, torch.float8_e4m3fn))
    assert running_sum_dtype([sd, sd], keys) == torch.float32
    assert running_sum_dtype([fp16, fp16], keys) == torch.float16
    assert running_sum_dtype([bf16, bf16], keys) == torch.bfloat16
    assert running_sum_dtype([fp8, fp8], keys) == torch.float16
    assert running_sum_dtype([bf16, fp8], keys) == torch.bfloat16  # fp8 values are exact in bfloat16
    assert running_sum_dtype([fp16, bf16], keys) == torch.float32  # neither holds the other
    assert running_sum_dtype([fp16, fp16, sd], keys) == torch.float32  # one float32 input: float32
    one_wide = fp16 | {keys[-1]: sd[keys[-1]]}
    assert running_sum_dtype([one_wide, fp16], keys) == torch.float32
    path = tmp_path / "m.safetensors"
    save_file(fp16, str(path))
    ckpt = open_checkpoint(path)
    detect_family(ckpt)
    assert running_sum_dtype([FileStateDict(ckpt), fp16], keys) == torch.float16  # from the header


def test_a_bad_sum_dtype_is_refused():
    spec, shapes = tiny_spec("sd1")
    models = [random_state_dict(shapes, seed=i) for i in range(2)]
    with pytest.raises(ValueError, match="sum_dtype must be float32, float16 or bfloat16"):
        merge_many(spec, models, sum_dtype=torch.float64)


class CountingReads(dict):
    """A lazy-looking mapping (fresh tensors, no `dtype()`): dtypes are only known by reading."""

    fresh_tensors = True

    def __init__(self, sd):
        super().__init__(sd)
        self.reads = 0

    def __getitem__(self, key):
        self.reads += 1
        return super().__getitem__(key).clone()


def test_inputs_without_headers_are_not_read_for_their_dtype_and_a_wide_one_widens_the_sum():
    c = Case("sd1")
    half = [CountingReads(sd) for sd in as_dtype(c.models, torch.float16)]
    events = []
    result = merge_many(c.spec, half, threads=1, on_progress=events.append, start="incremental")
    assert result.sum_dtype == torch.float16
    rebuilds = sum(type(e).__name__ == "SumRebuild" for e in events)
    assert rebuilds == 1
    for i in range(1, N):  # every read is an alignment's or a rebuild's: no scan for dtypes
        visits = sum(getattr(e, "model", None) == i and hasattr(e, "gain") for e in events)
        assert half[i].reads == (visits + rebuilds) * len(c.keys), i
    assert all(same_perms(result.perms[i], c.expected(i)) for i in range(N))
    # One float32 input among float16 ones, seen only when it is first read: S is widened exactly,
    # rebuilt once more, and the answer is the float32 sum's.
    mixed = [CountingReads(sd) for sd in as_dtype(c.models[:3], torch.float16)] + [CountingReads(c.models[3])]
    widened = merge_many(c.spec, mixed, threads=1)
    wide = merge_many(c.spec, [dict(m) for m in mixed], threads=1)
    assert (widened.sum_dtype, wide.sum_dtype) == (torch.float32, torch.float32)
    assert all(same_perms(p, q) for p, q in zip(widened.perms, wide.perms))
    assert [s.objective for s in widened.history] == pytest.approx(
        [s.objective for s in wide.history], rel=1e-6
    )


@pytest.mark.parametrize(
    ("dtypes", "want"),
    [
        ((torch.float8_e4m3fn,) * N, torch.float16),
        ((torch.float16, torch.float8_e4m3fn, torch.float16, torch.float8_e5m2), torch.float16),
        ((torch.bfloat16, torch.float8_e4m3fn, torch.bfloat16, torch.bfloat16), torch.bfloat16),
        ((torch.float32, torch.float8_e4m3fn, torch.float16, torch.float16), torch.float32),
    ],
    ids=["all-fp8", "fp16+fp8", "bf16+fp8", "fp32+fp8+fp16"],
)
def test_fp8_inputs_merge_exactly_in_a_wider_type(dtypes, want):
    """torch has no arithmetic mixing fp8 with other types: fp8 tensors are widened (exactly) first."""
    c = Case("sd1")
    models = [as_dtype([m], d)[0] for m, d in zip(c.models, dtypes)]
    result = merge_many(c.spec, models, threads=1)
    assert result.sum_dtype == want
    assert all(same_perms(result.perms[i], c.expected(i)) for i in range(N))
    keys = c.keys[:5]
    got = dict(merged_tensors(c.spec, models, result.perms, keys=keys, dtype=torch.float32))
    for k in keys:
        want_k = (
            sum(apply_permutation(c.spec, p, {k: m[k].float()})[k] for p, m in zip(result.perms, models)) / N
        )
        torch.testing.assert_close(got[k], want_k, rtol=1e-6, atol=1e-7)


def test_iters_zero_stops_after_one_pass():
    """No alignment can move a model: one pass shows it (not --max-passes passes of nothing)."""
    c = Case("sd1", n=3)
    result = merge_many(c.spec, c.models, threads=1, max_iter=0, max_passes=50)
    assert result.passes == 1 and not result.converged
    assert all(np.array_equal(p, np.arange(len(p))) for perms in result.perms for p in perms.values())


def test_huge_weights_are_normalised_without_overflow():
    spec, shapes = tiny_spec("sd1")
    models = [random_state_dict(shapes, seed=i) for i in range(2)]
    result = merge_many(spec, models, weights=[1e308, 1e308], max_iter=0)
    assert result.weights == [0.5, 0.5]


# --- the first pass (`start`), per-model reporting, weight 0, low memory ---


def shared_basis(family: str = "sd1", n: int = N):
    """Fine-tunes of one base: the base plus each model's own 1% noise, no permutation."""
    spec, shapes = tiny_spec(family)
    base = random_state_dict(shapes, seed=11)
    return spec, [add_noise(base, NOISE, seed=100 + i) for i in range(n)]


@pytest.mark.parametrize("start", ["incremental", "all-others", "auto"])
def test_shared_basis_inputs_stop_after_one_pass_with_all_others(start):
    """all-others: one pass of N - 1 alignments (every first target is already the mean of all the
    others); auto: the same and the reference's check (N); incremental: 2N - 3 (the first models'
    targets were partial means). All move nothing, and the output is the weighted mean of the
    inputs, bit for bit."""
    spec, models = shared_basis()
    weights = [0.4, 0.1, 0.2, 0.3]
    steps = []
    result = merge_many(spec, models, weights=weights, threads=1, start=start, on_progress=steps.append)
    assert result.converged and result.start == start and result.equals_weighted_mean
    want = {"all-others": (1, N - 1), "auto": (1, N), "incremental": (2, 2 * N - 3)}[start]
    assert (result.passes, result.alignments) == want and not result.restarted
    if start == "auto":  # the check: the reference against the mean of the others, last
        assert [s.model for s in result.steps][-1] == 0 and len({s.model for s in result.steps}) == N
    assert [s.unmoved for s in result.history] == [True] * result.passes
    assert [s.last for s in result.history] == [False] * (result.passes - 1) + [True]
    assert all(s.changed == 0 and s.units_moved == 0 for s in result.steps)
    keys = [k for k in spec.axes if k in models[0]]
    got = dict(merged_tensors(spec, models, result.perms, weights=weights, keys=keys, threads=1))
    for k in keys:
        want_k = models[0][k].to(torch.float32, copy=True).mul_(weights[0])
        for m, wi in zip(models[1:], weights[1:]):
            want_k.add_(m[k], alpha=wi)
        assert torch.equal(got[k], want_k), k


def test_all_others_recovers_the_hidden_permutations_of_two_models_and_of_one_odd_model():
    """N = 2: the mean of the others is the reference, so both starts are the pair merge. Among
    fine-tunes of one base, a model in another basis is brought back (the mean of the others is
    then that base, not a blur)."""
    c = Case("sd1", n=2)
    two = merge_many(c.spec, c.models, threads=1, start="all-others")
    assert same_perms(two.perms[1], c.expected(1)) and two.alignments == 1
    spec, models = shared_basis()
    odd = random_permutation(spec, seed=77)
    models[2] = apply_permutation(spec, odd, models[2])
    result = merge_many(spec, models, threads=1, start="all-others")
    assert result.converged
    assert same_perms(result.perms[2], invert(odd))
    assert all(np.array_equal(p, np.arange(len(p))) for i in (0, 1, 3) for p in result.perms[i].values())


def test_all_others_on_models_in_unrelated_bases_ends_below_the_incremental_start(case):
    """What --help says: when every model is in its own basis, the paper's first targets are
    blurs of unaligned models, and on the tiny recovery cases it ends in a worse optimum."""
    result = merge_many(case.spec, case.models, threads=1, start="all-others")
    assert result.history[-1].objective < case.result.history[-1].objective
    first = result.history[0].objective
    assert result.history[-1].objective >= first - 1e-7 * abs(first)  # (a float32 sum updated in place)


def test_each_models_result_is_reported_as_it_is_known_and_sent_to_listeners():
    from sd_mecha_rebasin.common import events
    from sd_mecha_rebasin.search.many import emit_progress

    c = Case("sd1", n=3)
    heard = []
    with events.listening(lambda event, data: heard.append((event, data))):
        result = merge_many(c.spec, c.models, threads=1, start="incremental", on_progress=emit_progress)
    names = [e for e, _ in heard]
    assert names[:2] == ["many_model", "many_model"] and "many_pass" in names
    steps = [d["step"] for e, d in heard if e == "many_model"]
    assert steps == result.steps
    first = steps[0]  # a first visit from the model's own basis: every hidden unit moves
    expected_units = sum(
        int(np.count_nonzero(p != np.arange(len(p)))) for p in c.expected(first.model).values()
    )
    assert first.units_moved == expected_units > 0 and first.units == sum(
        len(p) for p in result.perms[0].values()
    )
    assert first.changed == sum(
        not np.array_equal(p, np.arange(len(p))) for p in c.expected(first.model).values()
    )
    assert first.distance < 0.2 * first.distance_before
    for s in steps[1:]:
        assert s.distance <= s.distance_before * (1 + 1e-9)
    passes = [d["stats"] for e, d in heard if e == "many_pass"]
    assert passes == result.history and not passes[-1].unmoved and passes[-1].last


@pytest.mark.parametrize("start", ["incremental", "all-others"])
def test_a_model_of_weight_zero_is_aligned_once_after_the_others(start):
    c = Case("sd1")
    weights = [1.0, 1.0, 0.0, 1.0]
    result = merge_many(c.spec, c.models, weights=weights, threads=1, start=start)
    visits = [s.model for s in result.steps]
    assert visits.count(2) == 1 and visits[-1] == 2 and result.steps[-1].zero_weight
    if start == "incremental":  # (all-others: see the test above on unrelated bases)
        assert all(same_perms(result.perms[i], c.expected(i)) for i in range(N))
        without = merge_many(c.spec, [c.models[i] for i in (0, 1, 3)], threads=1, start=start)
        assert result.history[-1].objective == pytest.approx(without.history[-1].objective, rel=1e-6)


def test_low_memory_finds_the_float32_permutations(case):
    """Float32 inputs: a float16 sum and float16 copies of the model aligned (the recovery cases)."""
    result = merge_many(case.spec, case.models, threads=1, low_memory=True)
    assert result.sum_dtype == torch.float16 and result.low_memory
    assert all(same_perms(p, q) for p, q in zip(result.perms, case.result.perms))
    assert result.history[-1].objective == pytest.approx(case.result.history[-1].objective, rel=1e-6)


def test_low_memory_refuses_a_value_beyond_float16():
    from sd_mecha_rebasin.search.many import OutOfRange

    c = Case("sd1", n=2)
    models = [dict(m) for m in c.models]
    key = c.keys[3]
    models[1][key] = models[1][key].clone()
    models[1][key].view(-1)[0] = 1e6
    with pytest.raises(OutOfRange, match=f"model 2: {key} holds values beyond float16's range"):
        merge_many(c.spec, models, threads=1, low_memory=True)
    with pytest.raises(ValueError, match="start must be one of auto, incremental, all-others"):
        merge_many(c.spec, models, start="paper")


# --- start="auto": all-others until a model moves, then the incremental start ---


@pytest.fixture(scope="module")
def permuted(case):
    """Every model permuted (the recovery cases), merged with the incremental start and with auto
    (the default start: `case.result`)."""
    case.incremental = merge_many(case.spec, case.models, threads=1, start="incremental")
    case.auto = case.result
    return case


def test_auto_recovers_every_hidden_permutation_of_permuted_models(permuted):
    c, result = permuted, permuted.auto
    assert result.converged and result.restarted and result.start == "auto"
    for i in range(N):
        assert same_perms(result.perms[i], c.expected(i)), f"model {i}"
    # The same permutations as the incremental start, so the same objective (float32 sums in
    # place, built in other orders: equal to 1e-9); checked against its direct computation.
    assert all(same_perms(p, q) for p, q in zip(result.perms, c.incremental.perms))
    want = pairwise_objective(c.spec, c.models, result.perms, result.weights)
    assert result.history[-1].objective == pytest.approx(want, rel=1e-6)
    assert result.history[-1].objective == pytest.approx(c.incremental.history[-1].objective, rel=1e-9)


def test_auto_restarts_at_the_first_model_that_moves_and_costs_one_alignment_more(permuted):
    """The first all-others target is a blur of unaligned models, so its model moves: pass 1 is
    restarted incrementally, with that model last (its all-others answer is not reused: the
    others moved in the restart), and everything from there is the incremental start's."""
    steps = permuted.auto.steps
    assert steps[0].changed > 0 and steps[0].pass_index == 1
    assert steps[1].position == 1 and steps[1].model != steps[0].model
    assert permuted.auto.alignments == permuted.incremental.alignments + 1


@pytest.mark.parametrize("odd", [2, 0])
def test_auto_brings_back_one_permuted_model_among_fine_tunes_of_one_base(odd):
    """One model in another basis among fine-tunes of one base, a model (2) or the reference (0).
    all-others handles the first but not the second: with the reference fixed, each of the other
    models' best answer in its own basis is the others' majority basis, so it stops at once with
    the reference unaligned to the rest (a worse objective). auto recovers both: the model that
    moves (or the reference's check) restarts pass 1 incrementally."""
    spec, models = shared_basis()
    hidden = random_permutation(spec, seed=77)
    models[odd] = apply_permutation(spec, hidden, models[odd])
    expected = [identity_permutation(spec) for _ in range(N)]  # into model 0's basis
    if odd == 0:
        expected = [expected[0]] + [hidden] * (N - 1)
    else:
        expected[odd] = invert(hidden)
    result = merge_many(spec, models, threads=1, start="auto")
    assert result.converged and result.restarted
    assert all(same_perms(p, q) for p, q in zip(result.perms, expected))
    incremental = merge_many(spec, models, threads=1, start="incremental")
    assert all(same_perms(p, q) for p, q in zip(incremental.perms, expected))
    assert result.history[-1].objective == pytest.approx(incremental.history[-1].objective, rel=1e-9)
    paper = merge_many(spec, models, threads=1, start="all-others")
    if odd == 0:
        assert paper.alignments == N - 1 and paper.equals_weighted_mean
        assert paper.history[-1].objective < 0.9 * result.history[-1].objective
    else:
        assert all(same_perms(p, q) for p, q in zip(paper.perms, expected))


def test_auto_reuses_the_answer_of_the_model_that_moved_when_nothing_else_moves():
    """The odd model visited first: its all-others target is the base (the others share it), the
    restart aligns the others to the reference and to each other (nothing moves), and the odd
    model, last, would be aligned to the mean of all the others in their own bases: exactly its
    all-others alignment, so that alignment goes on from its one-sweep answer instead of starting
    again, and nothing else moves."""
    spec, models = shared_basis()
    hidden = random_permutation(spec, seed=77)
    first = merge_many(spec, models, threads=1, start="auto", max_passes=1).steps[0].model
    models[first] = apply_permutation(spec, hidden, models[first])
    result = merge_many(spec, models, threads=1, start="auto")
    assert result.restarted and same_perms(result.perms[first], invert(hidden))
    pass1 = [s.model for s in result.steps if s.pass_index == 1]
    assert pass1[0] == first and pass1.count(first) == 1 and len(pass1) == N - 1  # N - 2 in the restart
    assert all(s.changed == 0 for s in result.steps[1:])


def test_auto_on_two_models_is_the_pair_merge():
    c = Case("sd1", n=2)
    result = merge_many(c.spec, c.models, threads=1, start="auto")
    pair = weight_matching(c.spec, c.models[0], c.models[1], seed=0, threads=1)
    assert result.alignments == 1 and same_perms(result.perms[1], pair.perms)
    assert same_perms(result.perms[1], c.expected(1))
