"""The quality benchmark's pipeline (benchmarks/quality/): exact endpoints, a permutation keeps the
loss, the barrier formula, deterministic training, the real sd1-ldm key names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality import data, measure, models  # noqa: E402
from benchmarks.quality.train import TrainConfig, train  # noqa: E402
from sd_mecha_rebasin import (  # noqa: E402
    apply_permutation,
    permutation_spec,
    random_permutation,
    weight_matching,
)

WIDTH = models.Width(unet=16, clip=32, clip_heads=4, groups=4)
LAMBDAS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def digits():
    train_data, held = data.load_digits_split(8)
    small = data.Digits(held.latents[:24], held.labels[:24])
    return train_data, measure.eval_set(small)


def trained(train_data: data.Digits, seed: int, steps: int = 3) -> dict[str, torch.Tensor]:
    """Training is deterministic for one seed *and one thread count*; the module fixtures below
    are built before conftest's per-test one-thread fixture runs, so pin the count here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = models.build(WIDTH, seed)
        train(model, train_data, TrainConfig(steps=steps, seed=seed, batch=8, warmup=1))
        return models.to_ldm(model)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(digits):
    train_data, _ = digits
    return trained(train_data, 1), trained(train_data, 2)


def test_layout_is_sd1_ldm_and_roundtrips(digits):
    """Every text-encoder and UNet key of sd-mecha's sd1-ldm, and from_ldm(to_ldm(m)) computes m."""
    from support.layouts import key_shapes

    model = models.build(WIDTH, 0).eval()
    sd = models.to_ldm(model)
    assert set(sd) == set(key_shapes("sd1", "full"))
    _, evals = digits
    with torch.no_grad():
        want = model(evals.x_t, evals.t, evals.labels)
        got = models.from_ldm(WIDTH, sd)(evals.x_t, evals.t, evals.labels)
    assert torch.equal(want, got)


def test_training_is_deterministic(digits, pair):
    """The same seed twice gives the same weights; another seed (pair[1]) does not."""
    train_data, _ = digits
    again = trained(train_data, 1)
    first, other = pair
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_curve_endpoints_and_permutation(digits, pair):
    """Plain curve: exact endpoint losses. Re-based curve at lambda = 1: B's loss (a legal
    permutation keeps the function), with units actually moved."""
    _, evals = digits
    a, b = pair
    loss_a, loss_b = measure.loss(WIDTH, a, evals), measure.loss(WIDTH, b, evals)
    plain = measure.curve(WIDTH, a, b, evals, LAMBDAS)
    assert plain[0] == loss_a and plain[-1] == loss_b
    assert loss_a != loss_b

    spec = permutation_spec("sd1-ldm", arch=models.arch(WIDTH), shapes=models.ldm_shapes(WIDTH))
    result = weight_matching(spec, a, b, seed=0, threads=1)
    moved, total = measure.units_moved(result.perms)
    assert 0 < moved <= total
    b_aligned = apply_permutation(spec, result.perms, b)
    assert any(not torch.equal(b[k], b_aligned[k]) for k in b)
    rebased = measure.curve(WIDTH, a, b_aligned, evals, LAMBDAS)
    assert rebased[0] == loss_a
    assert rebased[-1] == pytest.approx(loss_b, rel=1e-5)


def test_barrier_formula():
    # max 1.5 minus the mean of the endpoints (1.0 + 0.8) / 2
    assert measure.barrier([1.0, 1.5, 1.2, 0.8]) == pytest.approx(0.6)
    assert measure.barrier([2.0, 1.5, 1.0]) == pytest.approx(0.5)  # Def. 2.2: the endpoints' mean
    assert measure.barrier([1.0, 0.9, 1.0]) == pytest.approx(0.0)  # max is an endpoint
    with pytest.raises(ValueError):
        measure.barrier([1.0])


def test_units_moved_and_average():
    import numpy as np

    assert measure.units_moved({"a": np.array([1, 0, 2]), "b": np.arange(4)}) == (2, 7)
    avg = measure.average([{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0]))


def test_loss_per_timestep_range(digits, pair):
    """loss_parts: the total is `loss` bit for bit, and the per-range means, weighted by how many
    samples fall in each range, give the total back (each sample counted once)."""
    _, evals = digits
    a, _ = pair
    total, parts = measure.loss_parts(WIDTH, a, evals)
    assert total == measure.loss(WIDTH, a, evals)
    counts = [int(((evals.t >= lo) & (evals.t < hi)).sum()) for lo, hi in measure.TIME_BUCKETS]
    assert sum(counts) == len(evals.t)
    present = [(p, c) for p, c in zip(parts, counts) if c]
    assert len(present) >= 2  # the fixed draw spreads the 24 samples over several ranges
    assert sum(p * c for p, c in present) / sum(counts) == pytest.approx(total, rel=1e-12)
    assert len({round(p, 9) for p, _ in present}) == len(present)  # ranges really differ


def test_collapse_corrections(pair):
    """REPAIR (benchmarks/quality/repair.py): the endpoints are the models themselves, the
    algorithm's correction at lambda 0 is the identity, and at lambda 0.5 every chosen layer's
    per-channel output std (and mean, where the layer has a bias) in the folded merge is the target
    on the statistics inputs. The data-free rescale: exact endpoints, target row norms at 0.5."""
    from benchmarks.quality import repair

    a, b = pair
    inputs = repair.stat_inputs(per_class=4)
    layers = repair.layer_names(WIDTH, (*repair.DEFAULT_FAMILIES, "qk"))
    forward = repair.sd_forward(WIDTH, inputs, layers)
    stats_a, stats_b = repair.channel_stats(forward, a), repair.channel_stats(forward, b)
    for lam, end in ((0.0, a), (1.0, b)):
        for got in (
            repair.repair(WIDTH, a, b, lam, inputs, layers),
            repair.rescale(a, b, lam, layers),
        ):
            assert set(got) == set(a) and all(torch.equal(got[k], end[k]) for k in a)
    for scale, shift in repair._corrections(forward, a, [1.0, 0.0], [stats_a, stats_b]).values():
        assert torch.allclose(scale, torch.ones_like(scale), atol=1e-6)
        assert shift is None or float(shift.abs().max()) < 1e-6

    merged = repair.repair_with(forward, a, b, 0.5, (stats_a, stats_b))
    stats_m = repair.channel_stats(forward, merged)
    plain = repair.channel_stats(forward, measure.interpolate(a, b, 0.5))
    collapsed = 0
    for name in layers:
        (mu_a, sd_a), (mu_b, sd_b), (mu, sd) = stats_a[name], stats_b[name], stats_m[name]
        target_sd = 0.5 * (sd_a + sd_b)
        assert torch.allclose(sd, target_sd, rtol=1e-3, atol=1e-6), name
        if name + ".bias" in a:
            tol = 1e-3 * float(target_sd.max())
            assert torch.allclose(mu, 0.5 * (mu_a + mu_b), rtol=1e-3, atol=tol), name
        collapsed += int((plain[name][1] < target_sd).sum())
    assert collapsed > 0  # the uncorrected merge has channels to repair

    half = repair.rescale(a, b, 0.5, layers)
    for name in layers:
        rows = [m[name + ".weight"].double().flatten(1).norm(dim=1) for m in (a, b, half)]
        assert torch.allclose(rows[2], 0.5 * (rows[0] + rows[1]), rtol=1e-6)


def test_collapse_correction_of_many(pair):
    """REPAIR of a weighted merge of N = 3 models: each chosen layer's per-channel std (and mean,
    with a bias) in the folded merge is the weighted mean of the models' own; a single weight of 1
    returns that model; two models at (1 - lam, lam) are `repair_with`'s merge bit for bit."""
    from benchmarks.quality import repair

    a, b = pair
    c = {k: v.flip(0) if k.endswith(".bias") else v * 0.9 for k, v in a.items()}  # a third function
    inputs = repair.stat_inputs(per_class=4)
    layers = repair.layer_names(WIDTH)
    forward = repair.sd_forward(WIDTH, inputs, layers)
    models3, weights = [a, b, c], [0.2, 0.3, 0.5]
    stats = [repair.channel_stats(forward, m) for m in models3]
    merged = repair.repair_many_with(forward, models3, weights, stats)
    got = repair.channel_stats(forward, merged)
    for name in layers:
        target_sd = sum(w * s[name][1] for w, s in zip(weights, stats))
        assert torch.allclose(got[name][1], target_sd, rtol=1e-3, atol=1e-6), name
        if name + ".bias" in a:
            target_mu = sum(w * s[name][0] for w, s in zip(weights, stats))
            tol = 1e-3 * float(target_sd.max())
            assert torch.allclose(got[name][0], target_mu, rtol=1e-3, atol=tol), name
    only = repair.repair_many_with(forward, models3, [0.0, 1.0, 0.0], stats)
    assert all(torch.equal(only[k], b[k]) for k in b)
    pair_merge = repair.repair_with(forward, a, b, 0.25, (stats[0], stats[1]))
    many_merge = repair.repair_many_with(forward, [a, b], [0.75, 0.25], stats[:2])
    assert all(torch.equal(pair_merge[k], many_merge[k]) for k in a)
    with pytest.raises(ValueError, match="2 models for 3 weights"):
        repair.repair_many_with(forward, [a, b], weights)


def test_fixed_head_width_models_keep_their_function_under_a_random_legal_permutation(digits):
    """`Width.head_width` (issue 20.3): diffusers builds heads of that width at every UNet level and
    in the text encoder, and the spec built from `models.arch` agrees with it: a random legal
    permutation leaves the forward pass unchanged. The default (8 heads) is unchanged."""
    assert models.unet_config(WIDTH)["attention_head_dim"] == 8
    assert models.arch(WIDTH)["unet"] == {"num_heads": 8, "groupnorm_groups": 4}
    width = models.Width(unet=16, clip=32, groups=4, head_width=8)
    assert width.name == "c16h8" and models.unet_config(width)["attention_head_dim"] == (2, 4, 8, 8)
    assert models.clip_config(width).num_attention_heads == 4
    with pytest.raises(ValueError, match="do not split"):
        models.Width(unet=12, clip=32, head_width=8).unet_heads(12)
    _, evals = digits
    model = models.build(width, 0).eval()
    sd = models.to_ldm(model)
    spec = permutation_spec("sd1-ldm", arch=models.arch(width), shapes=models.ldm_shapes(width))
    permuted = apply_permutation(spec, random_permutation(spec, seed=3), sd)
    with torch.no_grad():
        want = model(evals.x_t, evals.t, evals.labels)
        got = models.from_ldm(width, permuted)(evals.x_t, evals.t, evals.labels)
    assert any(not torch.equal(sd[k], permuted[k]) for k in sd)
    assert torch.allclose(want, got, rtol=1e-4, atol=1e-5)
    # heads of 8 are not SD1's 8 heads: the 8-head spec's permutation breaks this model
    wrong = permutation_spec("sd1-ldm", arch=models.arch(WIDTH), shapes=models.ldm_shapes(width))
    broken = apply_permutation(wrong, random_permutation(wrong, seed=3), sd)
    with torch.no_grad():
        assert not torch.allclose(
            want, models.from_ldm(width, broken)(evals.x_t, evals.t, evals.labels), atol=1e-3
        )
