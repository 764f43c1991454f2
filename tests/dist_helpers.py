"""Run a function on N gloo ranks in fresh processes (spawned), collecting results or errors."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable
from typing import Any


def rendezvous_file() -> str:
    """A fresh path for torch's FileStore: ranks meet through it with no port to race for (a
    port picked free and bound later can be taken by any client's source port meanwhile)."""
    return os.path.join(tempfile.mkdtemp(prefix="sv-rdzv-"), "store")


def _entry(
    fn: Callable[..., Any], rank: int, world: int, store: str, args: tuple[Any, ...], queue: Any
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout: float = 120.0,
    may_die: tuple[int, ...] = (),
    env: dict[str, str] | None = None,
) -> list[Any]:
    """``fn(rank, world, *args)`` on every rank; their results in rank order (None for a rank
    in ``may_die`` that died). Raises with every failing rank's traceback; other ranks that
    exit without reporting count as failures."""
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})  # spawned children inherit it
    context = mp.get_context("spawn")
    queue = context.Queue()
    store = rendezvous_file()
    processes = [
        context.Process(target=_entry, args=(fn, rank, world, store, args, queue), daemon=True)
        for rank in range(world)
    ]
    try:
        for process in processes:
            process.start()
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    results: dict[int, tuple[str, Any]] = {}
    expected = world - len(may_die)
    try:
        while len([r for r in results if r not in may_die]) < expected:
            rank, status, value = queue.get(timeout=timeout)
            results[rank] = (status, value)
    except Exception:
        pass
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
    shutil.rmtree(os.path.dirname(store), ignore_errors=True)
    failures = {r: v for r, (s, v) in results.items() if s != "ok"}
    missing = sorted(set(range(world)) - set(results) - set(may_die))
    if failures or missing:
        detail = "\n".join(f"--- rank {r} ---\n{v}" for r, v in sorted(failures.items()))
        raise AssertionError(f"ranks failed: {sorted(failures)}, no answer: {missing}\n{detail}")
    return [results[rank][1] if rank in results else None for rank in range(world)]
