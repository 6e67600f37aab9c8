"""`common/sd_mecha_compat.py` on whichever sd-mecha is installed (scripts/test-sd-mecha-versions.sh
runs this file on 1.1.6 and the 1.2.0 development branch, README's command on 1.1.8): the keys map
of `git_rebasin` as sd-mecha builds it, the version range and the probe for dev's varargs bug.
`unlimited_view` is what `git_rebasin`'s pre-pass reads through (tests/test_merge_method.py: every
merge there reads keys it did not declare for the current key)."""

from __future__ import annotations

import importlib.metadata

import pytest
from sd_mecha.extensions import merge_methods as mecha_methods
from sd_mecha.extensions import model_configs as mecha_configs
from support.sd_mecha_versions import varargs_merge_broken

from sd_mecha_rebasin.common import sd_mecha_compat as compat
from sd_mecha_rebasin.mecha.merge_method import bound_keys


def _params_per_clause(relation) -> list[set[str]]:
    return sorted((set(c.by_param) for c in relation.clauses), key=len)


@pytest.mark.parametrize("config", ["sd1-ldm", "sdxl-sgm"])
def test_git_rebasin_key_map_reads_ref_only_for_bound_keys(config):
    """`map_keys` learns the output config and the parameters through compat: a bound key may read
    `ref` (one clause with it, one without), any other key reads only `a` and the literals."""
    cfg = mecha_configs.resolve(config)
    key_map = mecha_methods.resolve("git_rebasin").build_key_map([cfg, cfg], {}, cfg)
    bound = bound_keys(config)
    bound_key = sorted(bound)[0]
    free_key = next(k for k in cfg.keys() if k not in bound)
    own = {"a", "iters", "seed", "threads", "device", "precision"}
    assert _params_per_clause(key_map[bound_key]) == [own, own | {"ref"}]
    assert _params_per_clause(key_map[free_key]) == [own]
    for relation in (key_map[bound_key], key_map[free_key]):
        assert all(keys == (relation.outputs[0],) for c in relation.clauses for keys in c.by_param.values())


def test_installed_version_is_in_the_supported_range():
    low, high = compat.SD_MECHA_RANGE
    assert low <= compat.SD_MECHA_VERSION < high
    assert importlib.metadata.version("sd-mecha").startswith(".".join(map(str, compat.SD_MECHA_VERSION)))
    assert compat.version_range_text().startswith(">=1.1.6,<1.3 (tested on 1.1.6, 1.1.7, 1.1.8, 1.2.0")


def test_varargs_probe_matches_the_version():
    """The probe that turns dev's varargs bug into strict xfails finds it on 1.2.0 and not on 1.1.x
    (so a release that fixes it makes those tests XPASS, and fail, until the list is cleared)."""
    assert varargs_merge_broken() == (compat.SD_MECHA_VERSION >= (1, 2, 0))
