"""Run a few blocking calls in parallel threads and collect their results in order.

Plain threads, not a ``ThreadPoolExecutor``: a save finishing in the background while the
interpreter shuts down must still be able to start its writer threads, and executors refuse new
work once shutdown has begun.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
MAX_THREADS = 8


def cpu_threads() -> int:
    """Threads worth running CPU-bound work in: the CPUs this process may use, at most 8."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, count))


def run_parallel(calls: Sequence[Callable[[], T]], name: str) -> list[T]:
    """Call each function in its own thread; re-raise the first failure after all finished."""
    if len(calls) == 1:
        return [calls[0]()]
    results: list[T | None] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)

    def work(index: int) -> None:
        try:
            results[index] = calls[index]()
        except BaseException as exc:  # re-raised in the caller's thread below
            errors[index] = exc

    threads = [
        threading.Thread(target=work, args=(i,), name=f"{name}-{i}") for i in range(len(calls))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return [result for result in results if result is not None]


PARALLEL_MIN_BYTES = 64 << 20  # below this, one thread copies as fast as several
BATCHES_PER_THREAD = 4


def run_sized(calls: Sequence[tuple[int, Callable[[], object]]], name: str) -> None:
    """Run GIL-releasing calls of known sizes (bytes) on one thread per CPU.

    The calls are cut, in order, into batches of about equal bytes that the threads pull from a
    shared queue, so a CPU that other work keeps busy only slows the batches it takes. Under
    ``PARALLEL_MIN_BYTES`` in all, or with one CPU, they run here, in order.
    """
    total = sum(size for size, _ in calls)
    threads = min(cpu_threads(), len(calls))
    if threads < 2 or total < PARALLEL_MIN_BYTES:
        for _, call in calls:
            call()
        return
    count = threads * BATCHES_PER_THREAD
    batches: list[list[Callable[[], object]]] = [[]]
    filled = 0
    for size, call in calls:
        batches[-1].append(call)
        filled += size
        if filled >= total * len(batches) / count and len(batches) < count:
            batches.append([])
    pending: queue.SimpleQueue[list[Callable[[], object]]] = queue.SimpleQueue()
    for batch in batches:
        if batch:
            pending.put(batch)

    def work() -> None:
        while True:
            try:
                batch = pending.get_nowait()
            except queue.Empty:
                return
            for call in batch:
                call()

    run_parallel([work] * threads, name)
