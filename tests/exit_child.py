"""A training job that ends in a chosen way, for the exit matrix (tests/test_exit_matrix.py).

    python tests/exit_child.py ENTRY STORE ENDING ROOT [LOCAL_DIR]

ENTRY: ``save`` (sv.save), ``load`` (sv.load), ``sync`` / ``async`` (a CheckpointManager),
``tiers`` (a local run replicated to ROOT), ``dist`` (a 2-rank gloo job; RANK, WORLD_SIZE and
EXIT_RENDEZVOUS, the path of torch's FileStore, in the environment). STORE: ``local``, ``s3``
(storage options as JSON in ``$EXIT_S3_OPTIONS``) or ``memory``. ENDING: ``normal`` (the
script ends without ``close()``), ``exception``, ``exit`` (``sys.exit(3)``), or ``signal``: the
job trains until the test signals it (SIGTERM, SIGINT, SIGKILL).

From step 2 on, every write of a shard file sleeps ``$EXIT_SLOW_S`` seconds first, so that a
save is in flight long enough to be interrupted. Lines on stdout (written with os.write:
nothing is lost when the process dies): ``SAVING <step>`` as a save starts, ``SAVED <step>``
once it returned, ``READY`` once the job is in its loop with a save in flight, ``VERIFIED <n>
<steps>`` from an exit hook registered before statevault's (so it runs after it) for memory://
runs, which no other process can see.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from typing import Any

import numpy as np

import statevault as sv
from statevault.engine import writer


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


SLOW = {"on": False}


def slow_down_writes() -> None:
    original = writer.write_file
    delay = float(os.environ.get("EXIT_SLOW_S", "0.5"))

    def slow(*args: Any, **kwargs: Any) -> Any:
        if SLOW["on"]:
            time.sleep(delay)
        return original(*args, **kwargs)

    writer.write_file = slow  # type: ignore[assignment]


def state(step: int) -> dict[str, Any]:
    # Two shard files' worth of arrays: the writes run in two threads.
    SLOW["on"] = step >= 2
    return {
        "a": np.full(1 << 18, step, dtype=np.float32),
        "b": np.arange(1 << 18, dtype=np.float64) + step,
        "step": step,
    }


def options(store: str) -> dict[str, Any] | None:
    return json.loads(os.environ["EXIT_S3_OPTIONS"]) if store == "s3" else None


def end(ending: str) -> None:
    """The end of the script for the endings that need no signal."""
    if ending == "exception":
        raise RuntimeError("boom: the training step failed")
    if ending == "exit":
        sys.exit(3)


def verify_at_exit(run: str, storage_options: dict[str, Any] | None) -> None:
    """For memory:// runs: list and verify what the run holds once statevault has closed it."""
    from statevault.manager.index import scan_run
    from statevault.storage.location import resolve

    steps = [r.step for r in scan_run(resolve(run, storage_options)).committed()]
    good = [
        s for s in steps if sv.verify(f"{run}/step_{s:09d}", storage_options=storage_options).ok
    ]
    say(f"VERIFIED {len(good)}/{len(steps)} {','.join(map(str, steps))}")


def run_save(root: str, store: str, ending: str) -> None:
    storage = options(store)
    sv.save(state(0), f"{root}/base", storage_options=storage)
    step = 1
    while True:
        say(f"SAVING {step}")
        if step == 2:
            say("READY")
        sv.save(state(step), f"{root}/ckpt", overwrite=True, storage_options=storage)
        say(f"SAVED {step}")
        if ending != "signal":
            return end(ending)
        step += 1


def run_load(root: str, store: str, ending: str) -> None:
    storage = options(store)
    sv.save(state(5), f"{root}/ckpt", storage_options=storage)
    for count in range(10**9):
        loaded = sv.load(f"{root}/ckpt", storage_options=storage)
        assert loaded["step"] == 5
        if count == 1:
            say("READY")
        if ending != "signal":
            return end(ending)
    return None


def run_manager(entry: str, root: str, store: str, ending: str, local_dir: str) -> None:
    storage = options(store)
    if entry == "tiers":
        mgr = sv.CheckpointManager(
            local_dir,
            async_save=True,
            replicate_to=sv.Replica(root, storage_options=storage),
            max_to_keep=2,
        )
    else:
        mgr = sv.CheckpointManager(
            root, async_save=entry != "sync", storage_options=storage, max_to_keep=3
        )
    for step in range(10**9):
        if mgr.should_save(step):
            say(f"SAVING {step}")
            mgr.save(step, state(step))
            say(f"SAVED {step}")
        if mgr.preempted:
            say("PREEMPTED")
            return  # ends without close(): the exit hook closes the manager
        if step == 2:
            if ending != "signal":
                return end(ending)
            say("READY")
        time.sleep(0.05)


def main() -> None:
    entry, store, ending, root = sys.argv[1:5]
    local_dir = sys.argv[5] if len(sys.argv) > 5 else ""
    if store == "memory" and entry in ("sync", "async", "tiers"):
        atexit.register(verify_at_exit, root, None)  # before statevault's hook: runs after it
    if entry == "dist":
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.environ['EXIT_RENDEZVOUS']}",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    slow_down_writes()
    if entry == "save":
        run_save(root, store, ending)
    elif entry == "load":
        run_load(root, store, ending)
    else:
        run_manager(entry, root, store, ending, local_dir)


if __name__ == "__main__":
    main()
