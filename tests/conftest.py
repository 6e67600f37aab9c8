"""Make `tests/support` importable as `support` from every test module, run the tiny models on one
torch thread, and mark the slow and full-size tests."""

import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from support.sd_mecha_versions import upstream_xfail  # noqa: E402

UNDER_XDIST = "PYTEST_XDIST_WORKER" in os.environ
"""README's test command runs one worker per core (`-n auto`); each worker then gets one core."""

if UNDER_XDIST:  # every test there is tiny (see below); this covers the module-scoped fixtures too,
    torch.set_num_threads(1)  # which are set up before any function-scoped fixture can act


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "full_size: a full-size SD model (GBs of RAM); implies slow, one xdist worker runs them all",
    )


SLOW_TESTS = frozenset(
    line.strip()
    for line in (pathlib.Path(__file__).parent / "slow_tests.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)
"""Functions out of the fast tier, by their measured time (tools/slow_tests.py writes the list)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Listed tests are slow, and so are full-size tests (README's command runs those in a process of
    their own, after the xdist workers: two at once could need twice the memory on CI's 24 GB).
    Tests that the installed sd-mecha cannot pass (support/sd_mecha_versions.py) are strict xfails."""
    for item in items:
        if item.nodeid.split("[")[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("full_size"):
            item.add_marker(pytest.mark.slow)
        if (upstream := upstream_xfail(item.nodeid)) is not None:  # an sd-mecha bug (dev branch)
            item.add_marker(upstream)


@pytest.fixture(autouse=True)
def _one_torch_thread_for_tiny_models(request: pytest.FixtureRequest):
    """Tiny tensors gain nothing from intra-op threads, and on 2 cores (shared, or beside the
    package's own worker threads) the threads' spin-waiting makes them many times slower: a tiny
    SDXL forward pass takes 0.7 s on one thread and 15 s on two on a loaded machine. Full-size tests
    keep torch's default when they have the machine to themselves (no xdist workers beside them)."""
    if request.node.get_closest_marker("full_size") and not UNDER_XDIST:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
