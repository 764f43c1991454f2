"""Run a few blocking calls in parallel threads and collect their results in order.

Plain threads, not a ``ThreadPoolExecutor``: a save finishing in the background while the
interpreter shuts down (and the reads and verifications of the exit hook, manager/closing.py)
must still be able to start threads, and executors refuse new work once shutdown has begun.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from statevault.engine.cancel import Cancel

T = TypeVar("T")
B = TypeVar("B")
MAX_THREADS = 8


def cpu_threads() -> int:
    """Threads worth running CPU-bound work in: the CPUs this process may use, at most 8."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, count))


def run_parallel(
    calls: Sequence[Callable[[], T]], name: str, cancel: Cancel | None = None
) -> list[T]:
    """Call each function in its own thread; re-raise the first failure after all finished.
    An interrupt (Ctrl-C) while waiting sets ``cancel`` and is raised once every thread has
    stopped (see :func:`join_all`)."""
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
    interrupt = join_all(threads, cancel)
    if interrupt is not None:
        raise interrupt
    for error in errors:
        if error is not None:
            raise error
    return [result for result in results if result is not None]


def join_all(threads: Sequence[threading.Thread], cancel: Cancel | None) -> BaseException | None:
    """Join every thread; return the interrupt that arrived meanwhile, if any. The interrupt
    sets ``cancel`` so that writers stop at their next chunk: the caller's cleanup then never
    races with a thread still writing into the directory it removes."""
    interrupt: BaseException | None = None
    for thread in threads:
        while thread.is_alive():
            try:
                thread.join()
            except BaseException as exc:  # KeyboardInterrupt, or another signal's exception
                interrupt = interrupt or exc
                if cancel is not None:
                    cancel.set("interrupted")
    return interrupt


PARALLEL_MIN_BYTES = 64 << 20  # below this, one thread copies as fast as several
BATCHES_PER_THREAD = 4


def byte_batches(sizes: Sequence[int], count: int) -> list[list[int]]:
    """The indices of ``sizes`` cut, in order, into at most ``count`` batches of about equal
    bytes (so that threads pulling them from a queue finish together)."""
    total = sum(sizes)
    batches: list[list[int]] = [[]]
    filled = 0
    for index, size in enumerate(sizes):
        batches[-1].append(index)
        filled += size
        if filled >= total * len(batches) / count and len(batches) < count:
            batches.append([])
    return [batch for batch in batches if batch]


def run_batches(batches: Sequence[B], run: Callable[[B], object], threads: int, name: str) -> None:
    """``run(batch)`` for every batch, on ``threads`` threads pulling batches from a shared
    queue: a CPU that other work keeps busy only slows the batches it takes."""
    pending: queue.SimpleQueue[B] = queue.SimpleQueue()
    for batch in batches:
        pending.put(batch)

    def work() -> None:
        while True:
            try:
                batch = pending.get_nowait()
            except queue.Empty:
                return
            run(batch)

    run_parallel([work] * min(threads, len(batches)), name)


def map_threads(function: Callable[[B], T], items: Sequence[B], threads: int, name: str) -> list[T]:
    """``[function(item) for item in items]`` on up to ``threads`` threads pulling items from a
    shared queue; results in order; the first failure is raised once all threads stopped.
    (Plain threads: a ``ThreadPoolExecutor`` refuses work once interpreter shutdown began, and
    statevault reads and verifies in its exit hook.)"""
    results: list[T | None] = [None] * len(items)

    def run(index: int) -> None:
        results[index] = function(items[index])

    run_batches([[i] for i in range(len(items))], lambda batch: run(batch[0]), threads, name)
    return results  # type: ignore[return-value]  # every slot was filled, or we raised


def run_sized(calls: Sequence[tuple[int, Callable[[], object]]], name: str) -> None:
    """Run GIL-releasing calls of known sizes (bytes) on one thread per CPU, in batches of about
    equal bytes (:func:`run_batches`). Under ``PARALLEL_MIN_BYTES`` in all, or with one CPU,
    they run here, in order."""
    threads = min(cpu_threads(), len(calls))
    if threads < 2 or sum(size for size, _ in calls) < PARALLEL_MIN_BYTES:
        for _, call in calls:
            call()
        return
    batches = byte_batches([size for size, _ in calls], threads * BATCHES_PER_THREAD)

    def run(batch: list[int]) -> None:
        for index in batch:
            calls[index][1]()

    run_batches(batches, run, threads, name)
