"""Make `tests/support` importable as `support` from every test module, and run the fast tier's
tiny models on one torch thread."""

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(autouse=True)
def _one_torch_thread_for_tiny_models(request: pytest.FixtureRequest):
    """Tiny tensors gain nothing from intra-op threads, and on 2 cores (shared, or beside the
    package's own worker threads) the threads' spin-waiting makes them many times slower: a tiny
    SDXL forward pass takes 0.7 s on one thread and 15 s on two on a loaded machine. Tests marked
    slow (full-size models) keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
