"""`worker_pool`: one thread means the calling thread, with a pool's semantics."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest
import torch

from sd_mecha_rebasin.common import memory
from sd_mecha_rebasin.common.workers import InlineExecutor, worker_pool


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
