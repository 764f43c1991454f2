"""Functions run on each rank by the distributed tests (importable by spawned processes).

Training uses one global batch per step split evenly over the ranks, so that FSDP2, DDP and a
single process compute the same update (each averages the gradient over the global batch) up to
float rounding, whatever the world size.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

import statevault as sv

GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 ranks


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Odd sizes: 13, 7 and 5 rows shard unevenly over 2, 3 and 4 ranks (5 rows over 4 ranks
    # leaves one rank with no rows at all).
    return torch.nn.Sequential(
        torch.nn.Linear(6, 13), torch.nn.ReLU(), torch.nn.Linear(13, 7), torch.nn.Linear(7, 5)
    )


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=generator)
    y = torch.randn(GLOBAL_BATCH, 5, generator=generator)
    share = GLOBAL_BATCH // world
    return x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]


def train(
    model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int, world: int
) -> None:
    for step in steps:
        x, y = batch(step, rank, world)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Every parameter and optimizer moment as a full numpy array (DTensors gathered): numpy,
    so that results cross the process boundary by value."""
    out = {f"model/{name}": _full(value) for name, value in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    for index, moments in opt.state_dict()["state"].items():
        for key, value in moments.items():
            out[f"opt/{names[index]}/{key}"] = _full(value)
    return out


def _full(value: Any) -> Any:
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return value.detach().clone().numpy()


def _build(layout: str, world: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module to train, the module whose state is saved and restored)."""
    model = make_model(seed=1)
    if layout == "fsdp":
        return shard_model(model), model
    if layout == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model), model
    return model, model


def session(
    rank: int,
    world: int,
    layout: str,
    load_from: str | None,
    steps: int,
    save_to: str | None,
    save_after: int | None = None,
) -> dict[str, Any]:
    """Build a model in ``layout`` ("fsdp", "ddp" or "plain"), restore from ``load_from`` (or
    start at step 0), train ``steps`` steps and save to ``save_to`` after ``save_after`` of
    them (default: at the end). Returns the full state at the end, and after the restore."""
    trained, stateful = _build(layout, world)
    opt = torch.optim.AdamW(trained.parameters(), lr=0.01)
    start = 0
    result: dict[str, Any] = {}
    if load_from is not None:
        state = sv.load(load_from, into={"model": stateful, "optimizer": opt})
        start = state["step"]
        result["restored"] = full_state(stateful, opt)
    save_at = start + (steps if save_after is None else save_after)
    for step in range(start, start + steps):
        train(trained, opt, range(step, step + 1), rank, world)
        if save_to is not None and step + 1 == save_at:
            sv.save(
                {
                    "model": stateful,
                    "optimizer": opt,
                    "step": step + 1,
                    "where": sv.PerRank({"rank": rank, "world": world}),
                },
                save_to,
            )
    if save_to is not None and steps == 0:
        sv.save({"model": stateful, "optimizer": opt, "step": start}, save_to)
    result["final"] = full_state(stateful, opt)
    result["files"] = sorted(os.listdir(save_to)) if save_to and rank == 0 else []
    return result


def mesh_2d_save(rank: int, world: int, path: str) -> dict[str, Any]:
    """A 2x2 mesh: one tensor sharded over both mesh dimensions, one replicated over the first
    and sharded over the second (HSDP-like), one plain replicated tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2))
    torch.manual_seed(5)
    a = torch.randn(10, 7)
    b = torch.randn(9, 4)
    c = torch.randn(3)
    state = {
        "a": distribute_tensor(a, mesh, [Shard(0), Shard(1)]),
        "b": distribute_tensor(b, mesh, [Replicate(), Shard(0)]),
        "c": c,
    }
    from statevault.checkpoint import open_checkpoint

    sv.save(state, path)
    everything = open_checkpoint(path).manifest  # sv.save's has this rank's chunks only
    return {
        "full": {"a": a.numpy(), "b": b.numpy(), "c": c.numpy()},
        "chunks": {s.path: len(s.chunks) for s in everything.sharded},
        "writers": sorted({t.file.split("-")[1] for t in everything.tensors}),
    }


def load_into_mesh(rank: int, world: int, path: str, key: str, dim: int) -> dict[str, Any]:
    """Load tensor ``key`` into a 1-D mesh sharded on ``dim``; count the bytes read."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from statevault.engine import regions

    counted = _count_region_reads(regions)
    mesh = init_device_mesh("cpu", (world,))
    shape, dtype = _template_for(path, key)
    target = distribute_tensor(torch.zeros(shape, dtype=dtype), mesh, [Shard(dim)])
    sv.load(path, into={key: target}, strict=False)
    return {
        "local": target.to_local().numpy(),
        "bytes": counted[0],
        "full": target.full_tensor().numpy(),
    }


def _template_for(path: str, key: str) -> tuple[tuple[int, ...], torch.dtype]:
    from statevault.checkpoint import open_checkpoint

    manifest = open_checkpoint(path).manifest
    for entry in manifest.sharded:
        if entry.path == key:
            return entry.shape, getattr(torch, entry.dtype)
    for row in manifest.tensors:
        if row.path == key:
            return row.shape, getattr(torch, row.dtype)
    raise KeyError(key)


def _count_region_reads(regions: Any) -> list[int]:
    counted = [0]
    original = regions.RegionReader._read

    def counting(self: Any, entry: Any, start: int, out: memoryview) -> None:
        counted[0] += len(out)
        original(self, entry, start, out)

    regions.RegionReader._read = counting
    return counted


def big_sharded_save(rank: int, world: int, path: str, rows: int, cols: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    sv.save({"w": distribute_tensor(full, mesh, [Shard(0)])}, path)


def per_rank_save(rank: int, world: int, path: str) -> None:
    sv.save({"pos": sv.PerRank({"batch": 100 + rank}), "shared": 7}, path)


def per_rank_load(rank: int, world: int, path: str) -> dict[str, Any]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = sv.load(path)
    return {"pos": state["pos"], "warned": [str(w.message) for w in caught]}


def differing_states(rank: int, world: int, path: str) -> str:
    try:
        sv.save({"w": torch.ones(3), "lr": 0.1 * (rank + 1)}, path)
    except sv.DistributedSaveError as exc:
        return str(exc)
    return "no error"


def failing_rank(rank: int, world: int, path: str, bad: int, how: str) -> dict[str, Any]:
    """Save once (committed), then save again while rank ``bad`` fails (``raise``) or dies
    (``kill``: SIGKILL of itself in the middle of writing its shards)."""
    import signal

    from statevault.engine import writer

    sv.save({"w": torch.full((1000,), float(rank == 0)), "step": 1}, f"{path}/one")
    original = writer.write_file

    def broken(*args: Any, **kwargs: Any) -> Any:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(28, "No space left on device (injected)")

    if rank == bad:
        writer.write_file = broken
    started = time.monotonic()
    try:
        # Six tensors dealt over three ranks: every rank has shards to write.
        tensors = {f"t{i}": torch.ones(1000 * (i + 1)) for i in range(6)}
        sv.save({**tensors, "step": 2}, f"{path}/two")
    except sv.DistributedSaveError as exc:
        return {"error": str(exc), "ranks": exc.ranks, "seconds": time.monotonic() - started}
    finally:
        writer.write_file = original
    return {"error": None, "seconds": time.monotonic() - started}


def collective_check(rank: int, world: int) -> int:
    value = torch.tensor([rank])
    dist.all_reduce(value)
    return int(value.item())


def numpy_equal(a: Any, b: Any) -> bool:
    return bool(np.array_equal(a, b))


def manager_session(
    rank: int,
    world: int,
    run: str,
    total: int,
    preempt_rank: int | None,
    preempt_at: int | None,
    async_save: bool,
) -> dict[str, Any]:
    """A training loop with the manager, as a user writes it: same code on every rank."""
    trained, stateful = _build("fsdp", world)
    opt = torch.optim.AdamW(trained.parameters(), lr=0.01)
    mgr = sv.CheckpointManager(
        run, max_to_keep=2, save_interval_steps=2, async_save=async_save, save_on_preemption=True
    )
    restored = mgr.restore(into={"model": stateful, "optimizer": opt})
    start = restored.step if restored else 0
    decisions = []
    stopped_at = None
    for step in range(start + 1, total + 1):
        train(trained, opt, range(step - 1, step), rank, world)
        if rank == preempt_rank and step == preempt_at:
            mgr.request_preemption()  # as the SIGTERM handler does, on this rank only
        due = mgr.should_save(step)
        decisions.append((step, due))
        if due:
            mgr.save(step, {"model": stateful, "optimizer": opt, "step": step})
        if mgr.preempted:
            stopped_at = step
            break
    mgr.close()
    return {
        "start": start,
        "decisions": decisions,
        "stopped_at": stopped_at,
        "steps": sorted(os.listdir(run)),
        "final": full_state(stateful, opt),
    }


def solo_dtensor(rank: int, world: int, path: str) -> dict[str, Any]:
    """One process with a one-rank mesh (FSDP2 on one GPU): sharded states save alone."""
    trained, stateful = _build("fsdp", world)
    opt = torch.optim.AdamW(trained.parameters(), lr=0.01)
    train(trained, opt, range(2), rank, world)
    manifest = sv.save({"model": stateful, "optimizer": opt}, f"{path}/sync")
    with sv.CheckpointManager(f"{path}/run", async_save=True) as mgr:
        mgr.save(2, {"model": stateful, "optimizer": opt})
    fresh, fresh_stateful = _build("fsdp", world)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    sv.load(f"{path}/run/step_000000002", into={"model": fresh_stateful, "optimizer": fresh_opt})
    return {
        "sharded": len(manifest.sharded),
        "version": manifest.format_version,
        "saved": full_state(stateful, opt),
        "restored": full_state(fresh_stateful, fresh_opt),
    }


class Position:
    """A data-loader position: a Stateful that differs per rank."""

    def __init__(self, batch: int = 0) -> None:
        self.batch = batch

    def state_dict(self) -> dict[str, int]:
        return {"batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch = state["batch"]


def per_rank_into(rank: int, world: int, path: str) -> int:
    """Save each rank's position, then restore it into a fresh object through sv.PerRank."""
    sv.save({"loader": sv.PerRank(Position(50 + rank))}, path)
    fresh = Position()
    sv.load(path, into={"loader": sv.PerRank(fresh)})
    return fresh.batch


def small_sharded_fixture(rank: int, world: int, path: str) -> None:
    """A small sharded checkpoint: a DTensor in two chunks, per-rank state, a plain tensor
    (format 3 from a world of 2; tests/golden/v2 is the same state written in format 2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(3)
    w = distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)])
    sv.save({"w": w, "pos": sv.PerRank({"i": rank}), "c": torch.arange(5.0)}, path)


def check_small_sharded(path: Any) -> None:
    """What one process loads and verifies from :func:`small_sharded_fixture`'s checkpoint."""
    with pytest.warns(UserWarning, match="saved by 2 processes"):
        state = sv.load(path)
    torch.manual_seed(3)
    assert torch.equal(state["w"], torch.randn(6, 4))
    assert state["pos"] == {"i": 0} and torch.equal(state["c"], torch.arange(5.0))
    assert sv.verify(path).ok


def s3_save_and_reshard(
    rank: int, world: int, url: str, options: dict[str, Any], save: bool
) -> dict[str, Any]:
    """FSDP2 state saved straight to an S3 bucket (no rename: manifest last), then loaded."""
    trained, stateful = _build("fsdp", world)
    opt = torch.optim.AdamW(trained.parameters(), lr=0.01)
    if save:
        train(trained, opt, range(2), rank, world)
        sv.save({"model": stateful, "optimizer": opt, "step": 2}, url, storage_options=options)
    else:
        sv.load(url, into={"model": stateful, "optimizer": opt}, storage_options=options)
    return full_state(stateful, opt)


def chief_only(rank: int, world: int, path: str) -> str | None:
    """The pre-statevault habit: only rank 0 saves (full tensors), the others carry on."""
    state = {"w": torch.full((4,), float(rank)), "step": 3}
    if rank == 0:
        manifest = sv.save(state, path, collective=False)
        assert manifest.format_version == 1 and manifest.ranks == 1
    dist.barrier()
    return str(sv.load(path)["w"].tolist())


def many_sharded_save(rank: int, world: int, path: str, count: int) -> None:
    """``count`` small row-sharded DTensors (and one tensor of several blocks, split unevenly
    across the ranks), saved to ``path``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(11)
    state = {
        f"w{i}": distribute_tensor(torch.randn(8, 5, generator=generator), mesh, [Shard(0)])
        for i in range(count)
    }
    big = torch.randn(1001, 1024, generator=generator)  # ~4 MiB: chunk edges inside blocks
    state["big"] = distribute_tensor(big, mesh, [Shard(0)])
    sv.save(state, path)


def interleaved_save(rank: int, world: int, path: str, count: int, rows: int) -> None:
    """``count`` row-sharded DTensors of ``rows`` x 1024 float32, each followed in the tree by
    a replicated scalar (as an optimizer's ``step`` follows its moments)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(5)
    state: dict[str, Any] = {}
    for i in range(count):
        weight = torch.randn(rows, 1024, generator=generator)
        state[f"w{i}"] = distribute_tensor(weight, mesh, [Shard(0)])
        state[f"step{i}"] = torch.tensor(float(i))
    sv.save(state, path)


def format3_save(rank: int, world: int, path: str) -> dict[str, Any]:
    """The FSDP2 model of the resharding tests after one step, saved by ``world`` ranks; its
    full state, and the metadata sizes: manifest, index table, this rank's own index."""
    trained, stateful = _build("fsdp", world)
    opt = torch.optim.AdamW(trained.parameters(), lr=0.01)
    train(trained, opt, range(1), rank, world)
    state = {"model": stateful, "optimizer": opt, "step": 1, "where": sv.PerRank(rank)}
    sv.save(state, path)
    return {
        "full": full_state(stateful, opt),
        "manifest": os.path.getsize(os.path.join(path, "manifest.json")),
        "table": os.path.getsize(os.path.join(path, "indexes.tbl")),
        "own_index": os.path.getsize(os.path.join(path, f"index-r{rank:05d}.json")),
    }


def format3_load(rank: int, world: int, paths: list[str]) -> list[dict[str, Any]]:
    """Each checkpoint of ``paths`` restored into a fresh FSDP2 model on ``world`` ranks: the
    full state restored, and the ranks whose indexes the load read."""
    from statevault.checkpoint import indexes

    read: list[int] = []
    original = indexes.with_indexes

    def recording(location: Any, dir_fd: Any, manifest: Any, ranks: Any) -> Any:
        read.extend(range(manifest.ranks) if ranks is None else ranks)
        return original(location, dir_fd, manifest, ranks)

    indexes.with_indexes = recording  # type: ignore[assignment]
    results = []
    for path in paths:
        read.clear()
        trained, stateful = _build("fsdp", world)
        opt = torch.optim.AdamW(trained.parameters(), lr=0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per-rank state from another world size: said
            state = sv.load(path, into={"model": stateful, "optimizer": opt})
        results.append(
            {"full": full_state(stateful, opt), "read": sorted(set(read)), "where": state["where"]}
        )
    return results
