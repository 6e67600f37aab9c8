"""Proof by forward pass: a permutation from the spec leaves the whole model's output unchanged.

The reference implementations (diffusers, transformers, open_clip; tests/support/forward.py) know
nothing of this package: they load the permuted state dict in the original key layout, run the
text encoder(s) into the UNet, and their output must match the unpermuted model's to 1e-5.
Negative controls build the spec with wrong architecture facts and must be caught.
"""

from __future__ import annotations

import gc

import pytest
from support.forward import max_rel_error, run_model
from support.layouts import arch_overrides, key_shapes, random_state_dict

from sd_mecha_rebasin import apply_permutation, permutation_spec, random_permutation
from sd_mecha_rebasin.permutations.spec import Permutations, permute_tensor

FAMILIES = {"sd1": "sd1-ldm", "sd2": "sd2-ldm", "sdxl": "sdxl-sgm"}
LEGAL = 1e-5
ILLEGAL = 1e-3


def tiny(family: str, arch: dict | None = None):
    shapes = key_shapes(family, "tiny")
    spec = permutation_spec(FAMILIES[family], arch=arch or arch_overrides(family, "tiny"), shapes=shapes)
    return spec, random_state_dict(shapes, seed=21)


def only(perms: Permutations, spec, kinds: set[str]) -> Permutations:
    return {name: p for name, p in perms.items() if spec.spaces[name].kind in kinds}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_case(request):
    family = request.param
    spec, sd = tiny(family)
    return family, spec, sd, run_model(family, "tiny", dict(sd))


def test_random_legal_permutation_preserves_the_function(tiny_case):
    family, spec, sd, reference = tiny_case
    for seed in (0, 1):
        permuted = apply_permutation(spec, random_permutation(spec, seed), sd)
        changed = sum(not permuted[k].equal(sd[k]) for k in spec.axes)
        assert changed > 0.9 * len(spec.axes), "the permutation must actually move the weights"
        assert max_rel_error(reference, run_model(family, "tiny", permuted)) <= LEGAL


def test_every_kind_of_space_is_legal_on_its_own(tiny_case):
    family, spec, sd, reference = tiny_case
    perms = random_permutation(spec, 5)
    for kind in sorted({s.kind for s in spec.spaces.values()}):
        permuted = apply_permutation(spec, only(perms, spec, {kind}), sd)
        assert max_rel_error(reference, run_model(family, "tiny", permuted)) <= LEGAL, kind


@pytest.mark.parametrize(
    "family, wrong_arch, kinds",
    [
        # q/k permuted inside "heads" twice as wide as the real ones: crosses head boundaries.
        ("sd1", {"unet": {"num_heads": 4}}, {"attention_heads"}),
        ("sdxl", {"unet": {"head_dim": 16}}, {"attention_heads"}),
        ("sd2", {"clip_h": {"heads": 2}}, {"attention_heads"}),
        # GroupNorm taken as one group: channels move across groups.
        ("sd1", {"unet": {"groupnorm_groups": 1}}, {"resblock_inner"}),
        ("sdxl", {"unet": {"groupnorm_groups": 1}}, {"unet_stream"}),
    ],
)
def test_wrong_architecture_facts_are_caught(family, wrong_arch, kinds):
    arch = arch_overrides(family, "tiny")
    for part, facts in wrong_arch.items():
        arch[part] = {**arch[part], **facts}
        if "num_heads" in facts or "head_dim" in facts:  # the override's head rule replaces the other
            arch[part].pop("head_dim" if "num_heads" in facts else "num_heads", None)
    spec, sd = tiny(family, arch)
    reference = run_model(family, "tiny", dict(sd))
    permuted = apply_permutation(spec, only(random_permutation(spec, 3), spec, kinds), sd)
    assert max_rel_error(reference, run_model(family, "tiny", permuted)) > ILLEGAL


def _full_size_check(family: str, regenerate: bool) -> float:
    """Full-size model in fp16 storage (fp32 compute); SDXL regenerates A instead of keeping it."""
    import torch

    shapes = key_shapes(family, "full")
    spec = permutation_spec(FAMILIES[family], shapes=shapes)
    perms = random_permutation(spec, 0)
    sd = random_state_dict(shapes, seed=5, dtype=torch.float16)
    if regenerate:
        reference = run_model(family, "full", sd, consume=True)
        del sd
        gc.collect()
        sd = random_state_dict(shapes, seed=5, dtype=torch.float16)
    else:
        reference = run_model(family, "full", dict(sd), consume=True)
    permuted = {}
    for key in list(sd):
        permuted[key] = permute_tensor(spec, key, sd.pop(key), perms)
    gc.collect()
    return max_rel_error(reference, run_model(family, "full", permuted, consume=True))


@pytest.mark.full_size
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_permutation_preserves_the_function(family):
    assert _full_size_check(family, regenerate=False) <= LEGAL


@pytest.mark.full_size
def test_full_size_sdxl_permutation_preserves_the_function():
    assert _full_size_check("sdxl", regenerate=True) <= LEGAL


def test_an_override_head_rule_replaces_the_familys():
    """SD1's family rule is 8 heads at every level; `arch={"unet": {"head_dim": 8}}` must give
    heads 8 wide (it once kept the family's num_heads, which wins, and was silently ignored), and
    SDXL's 64-wide heads give way to an override's num_heads. Both at once is refused."""
    from sd_mecha_rebasin.architectures import family_facts

    assert family_facts("sd1-ldm")["unet"]["num_heads"] == 8
    unet = family_facts("sd1-ldm", {"unet": {"head_dim": 8}})["unet"]
    assert unet["head_dim"] == 8 and "num_heads" not in unet and unet["groupnorm_groups"] == 32
    unet = family_facts("sdxl-sgm", {"unet": {"num_heads": 4}})["unet"]
    assert unet["num_heads"] == 4 and "head_dim" not in unet
    assert family_facts("sdxl-sgm", {"unet": {"groupnorm_groups": 1}})["unet"]["head_dim"] == 64
    with pytest.raises(ValueError, match="num_heads or head_dim, not both"):
        family_facts("sd1-ldm", {"unet": {"num_heads": 8, "head_dim": 8}})
