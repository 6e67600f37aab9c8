"""The worker pools of matching and merging, where one thread means no pool at all.

A one-thread `ThreadPoolExecutor` still hands every task to another thread and back: on the many
small tensors of a tiny SDXL model (2266 keys, ~75k tasks per MergeMany) the hand-offs and the GIL
waits were a third of the time (one MergeMany of 4 tiny SDXL models: 19.2 s pooled, 12.5 s
inline). `worker_pool(1)` runs each task in the calling thread when it is submitted (`map`: when
its result is asked for), with the same results, which never depend on the thread count anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor, as_completed
from typing import Any

from .memory import forget_scratch


class InlineExecutor(Executor):
    """An `Executor` that runs each task in the calling thread.

    `submit` runs the task at once and returns a finished future (an `Exception` is kept in it, as
    a pool keeps it; `KeyboardInterrupt` and other `BaseException`s propagate at once, as they
    would in the calling thread). `map` is lazy: each task runs when its result is consumed, so
    progress reported per result follows the work as with a pool.
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - kept for .result(), as a pool keeps it
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout=None, chunksize=1
    ) -> Iterator[Any]:
        return (fn(*args) for args in zip(*iterables))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """The calling thread's scratch buffers go, as a pool's go with its threads."""
        forget_scratch()


@contextlib.contextmanager
def worker_pool(threads: int) -> Iterator[Executor]:
    """A pool of `threads` worker threads, or the calling thread itself when `threads <= 1`."""
    with InlineExecutor() if threads <= 1 else ThreadPoolExecutor(max_workers=threads) as pool:
        yield pool


def as_they_finish(
    pool: Executor, fn: Callable[[Any], Any], items: Iterable[Any]
) -> Iterator[tuple[int, Any]]:
    """`(i, fn(items[i]))` for every item, as each task finishes: on a pool, in the order they end;
    inline, one task at a time (so progress reported per result follows the work either way)."""
    if isinstance(pool, InlineExecutor):
        yield from ((i, fn(item)) for i, item in enumerate(items))
        return
    futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
    for future in as_completed(futures):
        yield futures[future], future.result()
