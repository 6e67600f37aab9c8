"""`git_rebasin_many` end to end through `sd_mecha.merge` on tiny models with the real key names."""

from __future__ import annotations

import math

import pytest
import sd_mecha
import torch
from sd_mecha.extensions import merge_methods as mecha_methods
from test_merge_method import _one_torch_thread, noise_like, tiny  # noqa: F401  (fixtures)

import sd_mecha_rebasin
from sd_mecha_rebasin import rebasin_many
from sd_mecha_rebasin.mecha import merge_method_many

N = 3


def distance(a, b, keys) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys))


class Many:
    """Model i = pi_i(ref + noise_i), pi_0 the identity: the reference's basis is the base's."""

    def __init__(self, t, n: int = N):
        self.t = t
        self.fine = [
            {k: v + e for (k, v), e in zip(t.ref.items(), noise_like(t.ref, seed=40 + i).values())}
            for i in range(n)
        ]
        self.states = [self.fine[0]] + [t.permuted(self.fine[i], seed=60 + i) for i in range(1, n)]
        self.nodes = [t.model(f"many{i}", sd) for i, sd in enumerate(self.states)]
        self.bound = [k for k in t.spec.axes if k in t.ref]

    def plain_mean(self) -> dict[str, torch.Tensor]:
        """What `sd_mecha.n_average` of the nodes gives on the bound keys, without an sd-mecha merge."""
        return {k: sum(s[k] for s in self.states) / len(self.states) for k in self.bound}


@pytest.fixture(scope="module")
def many(tiny):  # noqa: F811  (the imported fixture)
    """`many(family)`: that family's Many, built (and its files written) once for the module; tests only read it."""
    made: dict[str, Many] = {}

    def get(family: str) -> Many:
        if family not in made:
            made[family] = Many(tiny(family))
        return made[family]

    return get


SHARED = {"weights": "1,2,1", "ref": 0, "iters": 50, "threads": 2}
"""Non-default settings of test_members... and test_mecha_round_trip: in one process the round trip
finds the members' pre-pass in the memo (each test still runs and checks its own merges)."""


@pytest.fixture(scope="module")
def counted(monkeypatch_module):
    calls = []
    original = merge_method_many._prepass

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch_module.setattr(merge_method_many, "_prepass", counting)
    return calls


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_registered_under_its_own_identifier():
    assert mecha_methods.resolve("git_rebasin_many") is rebasin_many
    assert sd_mecha_rebasin.rebasin_many is rebasin_many


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_mean_of_the_rebased_models(many, family):
    m = many(family)
    t = m.t
    out = t.merge(rebasin_many(*m.nodes, threads=1))
    ideal = {k: sum(f[k] for f in m.fine) / N for k in t.ref}
    plain = m.plain_mean()
    ideal_distance = distance(ideal, t.ref, m.bound)
    assert distance(out, t.ref, m.bound) <= 1.01 * ideal_distance
    assert distance(plain, t.ref, m.bound) > 20 * ideal_distance
    for key in [k for k in t.ref if k not in t.spec.axes][:5]:  # unbound keys: the plain mean
        torch.testing.assert_close(out[key], ideal[key], rtol=1e-5, atol=1e-6)


def test_members_are_the_rebased_models_and_share_one_prepass(many, counted):
    m = many("sd1")
    t = m.t
    merge_method_many.forget_prepasses()
    before = len(counted)
    members = [rebasin_many(*m.nodes, member=i, **SHARED) for i in range(N)]
    for i, node in enumerate(members):
        out = t.merge(node)
        torch.testing.assert_close(out, m.fine[i], rtol=0, atol=0)  # pi_i found exactly
    assert len(counted) - before == 1  # the memo: one pre-pass for the N member nodes
    # Chained in one recipe (weighted mean of the members) = the method's own weighted mean.
    mean = t.merge(rebasin_many(*m.nodes, **SHARED))
    chained = t.merge(
        sd_mecha.weighted_sum(sd_mecha.weighted_sum(members[0], members[2], alpha=0.5), members[1], alpha=0.5)
    )
    for key in m.bound:
        torch.testing.assert_close(chained[key], mean[key], rtol=1e-5, atol=1e-6)
    assert len(counted) - before == 1


def test_the_reference_sets_the_basis(many):
    m = many("sd1")
    t = m.t
    out = t.merge(rebasin_many(*m.nodes, ref=1, member=0, threads=1))
    expected = t.permuted(m.fine[0], seed=61)  # model 0 in model 1's basis
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_mecha_round_trip(many):
    m = many("sd1")
    recipe = rebasin_many(*m.nodes, **SHARED)  # non-default weights and iters
    text = sd_mecha.serialize(recipe, finalize=False)
    assert '"git_rebasin_many"' in text
    again = sd_mecha.deserialize(text.splitlines())
    assert sd_mecha.serialize(again, finalize=False) == text
    a, b = m.t.merge(recipe), m.t.merge(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": "1,2"}, "got 2 weights for 3 models"),
        ({"weights": "1,x,1"}, "is not a comma-separated list"),
        ({"weights": "0,1,1"}, "the reference (model 1) has weight 0"),
        ({"member": 3}, "member 3 is out of range"),
    ],
)
def test_bad_parameters_raise_clear_errors(many, kwargs, message):
    m = many("sd1")
    with pytest.raises(ValueError) as info:
        m.t.merge(rebasin_many(*m.nodes, **kwargs))
    assert "git_rebasin_many" in str(info.value) and message in str(info.value)


def test_start_and_low_memory_reach_the_prepass_and_events(many):
    """The sd-mecha route takes `start` and `low_memory`, and sends each model's result to listeners."""
    from sd_mecha_rebasin.common import events

    m = many("sd1")
    t = m.t
    heard = []
    with events.listening(lambda event, data: heard.append((event, data))):
        out = t.merge(rebasin_many(*m.nodes, threads=1, start="all-others", low_memory=True, seed=4))
    steps = [d["step"] for e, d in heard if e == "many_model"]
    assert len(steps) >= N - 1 and {s.model for s in steps} == {1, 2}
    assert any(e == "many_pass" and d["stats"].last for e, d in heard)
    assert distance(out, t.ref, m.bound) < distance(m.plain_mean(), t.ref, m.bound)
    with pytest.raises(Exception, match="start 'paper' is not one of auto, incremental, all-others"):
        t.merge(rebasin_many(*m.nodes, threads=1, start="paper"))
