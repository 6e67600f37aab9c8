"""`worker_pool`: one thread means the calling thread, with a pool's semantics."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest
import torch

from sd_mecha_rebasin.common import memory
from sd_mecha_rebasin.common.workers import InlineExecutor, as_they_finish, worker_pool


def test_one_thread_runs_in_the_calling_thread_and_more_run_in_a_pool():
    with worker_pool(1) as pool:
        assert isinstance(pool, InlineExecutor)
        assert pool.submit(threading.get_ident).result() == threading.get_ident()
    with worker_pool(0) as pool:
        assert isinstance(pool, InlineExecutor)
    with worker_pool(2) as pool:
        assert isinstance(pool, ThreadPoolExecutor)
        assert pool.submit(threading.get_ident).result() != threading.get_ident()


def test_inline_failures_are_kept_in_the_future_as_a_pool_keeps_them():
    def fail(x):
        raise ValueError(f"bad {x}")

    with worker_pool(1) as pool:
        future = pool.submit(fail, 3)
        assert future.done() and list(as_completed([future])) == [future]
        with pytest.raises(ValueError, match="bad 3"):
            future.result()
        results = pool.map(fail, [1])  # raised when the result is asked for, as with a pool
        with pytest.raises(ValueError, match="bad 1"):
            list(results)


def test_inline_map_runs_each_task_when_its_result_is_consumed():
    ran = []
    with worker_pool(1) as pool:
        results = pool.map(lambda x: ran.append(x) or 2 * x, [1, 2, 3])
        assert ran == []
        assert next(results) == 2 and ran == [1]
        assert list(results) == [4, 6] and ran == [1, 2, 3]


def test_ctrl_c_in_an_inline_task_is_not_swallowed():
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), worker_pool(1) as pool:
        pool.submit(interrupted)


def test_the_calling_threads_scratch_buffers_go_with_the_inline_pool():
    """A pool's per-thread buffers (up to 200 MB at SDXL widths) end with its threads; inline,
    they would stay with the caller for good."""
    with worker_pool(1) as pool:
        buffer = pool.submit(memory.scratch, "cost", (4, 4), torch.float32).result()
        assert memory.scratch("cost", (4, 4), torch.float32).data_ptr() == buffer.data_ptr()
    assert memory.scratch("cost", (4, 4), torch.float32).data_ptr() != buffer.data_ptr()


def test_as_they_finish_gives_every_result_once_with_its_index():
    items = list(range(20))
    with worker_pool(2) as pool:
        got = dict(as_they_finish(pool, lambda x: x * x, items))
    assert got == {i: i * i for i in items}
    ran = []
    with worker_pool(1) as pool:
        results = as_they_finish(pool, lambda x: ran.append(x) or -x, [5, 6])
        assert next(results) == (0, -5) and ran == [5]  # inline: each task when its turn comes
        assert list(results) == [(1, -6)] and ran == [5, 6]


def test_one_thread_reports_each_solve_as_it_finishes(monkeypatch):
    """`--threads 1`: the sweep bar moves with each solve, not once per run of independent spaces."""
    from support.layouts import arch_overrides, key_shapes, random_state_dict

    from sd_mecha_rebasin import permutation_spec
    from sd_mecha_rebasin.search import matching

    shapes = key_shapes("sd1", "tiny")
    spec = permutation_spec("sd1-ldm", arch=arch_overrides("sd1", "tiny"), shapes=shapes)
    a, b = random_state_dict(shapes, seed=1), random_state_dict(shapes, seed=2)
    log = []
    solve = matching._solve
    monkeypatch.setattr(matching, "_solve", lambda *args: log.append("work") or solve(*args))
    matching.weight_matching(
        spec, a, b, threads=1, max_iter=1, warm_start=False, on_progress=lambda e, d: log.append(e)
    )
    sweep = log[log.index("sweep_start") + 1 :]
    n = len(spec.spaces)  # sweep 1 solves every space, and reports each one right after it
    assert sweep[: 2 * n] == ["work", "solve"] * n
