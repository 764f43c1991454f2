"""Incremental checkpoints, measured in one run: statevault against itself with
``incremental=False``, against torch.save, safetensors and DCP, and against the physical floor.

    python benchmarks/incremental_bench.py                 # 64 MiB base, 256 MiB dense, 3 reps
    python benchmarks/incremental_bench.py --quick         # 32 MiB base, 64 MiB dense, 1 rep
    python benchmarks/incremental_bench.py --json out.json

Three parts (benchmarks/README.md says what each row means):

1. A LoRA-like run: a frozen base (4 linear layers, ``--base-mib`` in all) with rank-8 adapters
   trained by AdamW (adapters and their two moments ~1.5 MiB). Every checkpointer saves the
   same 8 steps into one run directory and keeps the newest 3. Bytes written per save and the
   run directory's size are read from the filesystem (new inodes; hard links counted once).
2. A dense state (``--dense-mib``, every tensor changes before every save): the stall and the
   durable time of an asynchronous manager save, and the time of a synchronous one, with
   incremental saves on and off, in turns (``--dense-reps`` each); the ratio is the median of
   each save's ratio to its neighbour's.
3. Restore time after 1, 4 and 16 incremental saves of the LoRA run: no delta chains.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import statevault as sv
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
    import statevault as sv

import _floors  # noqa: E402
import _peers  # noqa: E402

MiB = 1 << 20
LAYERS, RANK, KEEP, SAVES = 4, 8, 3, 8
# Targets of issue 14.
WRITTEN_LIMIT, DIR_LIMIT, DURABLE_LIMIT = 1.1, 1.15, 1.05


# ---- the LoRA-like run -------------------------------------------------------------------------


class LoraRun:
    """A frozen base of ``LAYERS`` square linear layers with LoRA adapters of rank ``RANK``."""

    def __init__(self, base_bytes: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        width = int((base_bytes / LAYERS / 4) ** 0.5)
        self.base = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(LAYERS)))
        self.base.requires_grad_(False)
        self.adapters = torch.nn.ParameterList()
        for _ in range(LAYERS):
            self.adapters.append(torch.nn.Parameter(torch.randn(width, RANK) * 0.01))
            self.adapters.append(torch.nn.Parameter(torch.zeros(RANK, width)))
        self.optimizer = torch.optim.AdamW(self.adapters.parameters(), lr=1e-3)
        self.width = width

    def step(self) -> None:
        x = torch.randn(8, self.width)
        for index, layer in enumerate(self.base):
            x = torch.tanh(layer(x) + x @ self.adapters[2 * index] @ self.adapters[2 * index + 1])
        x.square().mean().backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.optimizer.zero_grad()

    def state(self) -> dict[str, Any]:
        """What a training script hands the manager: modules and the optimizer."""
        return {"base": self.base, "adapters": self.adapters, "optimizer": self.optimizer}

    def tensors(self) -> dict[str, Any]:
        """The same state as plain tensors, for the peers."""
        moments = {
            f"{index}/{key}": value.detach()
            for index, state in enumerate(self.optimizer.state.values())
            for key, value in state.items()
        }
        return {
            "base": dict(self.base.state_dict()),
            "adapters": {str(i): p.detach() for i, p in enumerate(self.adapters)},
            "optimizer": moments,
        }

    def base_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.base.state_dict().values())

    def changed_bytes(self) -> int:
        flat = _peers.flatten(self.tensors())
        return sum(t.numel() * t.element_size() for k, t in flat.items() if "base" not in k)


def inodes(directory: str) -> dict[tuple[int, int], int]:
    """Every file under ``directory`` by inode, with its size (hard links counted once)."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            info = os.lstat(os.path.join(root, name))
            found[(info.st_dev, info.st_ino)] = info.st_size
    return found


class RunSaver:
    """One checkpointer saving steps into a run directory and keeping the newest ``KEEP``."""

    def __init__(self, name: str, note: str, run: str) -> None:
        self.name, self.note, self.run = name, note, run

    def save(self, step: int, lora: LoraRun) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


class ManagerSaver(RunSaver):
    def __init__(self, name: str, note: str, run: str, incremental: bool) -> None:
        super().__init__(name, note, run)
        self.manager = sv.CheckpointManager(run, max_to_keep=KEEP, incremental=incremental)

    def save(self, step: int, lora: LoraRun) -> None:
        self.manager.save(step, lora.state())

    def close(self) -> None:
        self.manager.close()


class PeerSaver(RunSaver):
    """A peer of benchmarks/_peers.py, with the retention a training script would write."""

    def __init__(self, peer: _peers.Peer, run: str) -> None:
        super().__init__(peer.name, peer.note, run)
        self.peer = peer
        os.makedirs(run)

    def save(self, step: int, lora: LoraRun) -> None:
        self.peer.save(lora.tensors(), os.path.join(self.run, f"step_{step:09d}"))
        for old in sorted(os.listdir(self.run))[:-KEEP]:
            shutil.rmtree(os.path.join(self.run, old))


def lora_rows(base: str, base_bytes: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every checkpointer over the same LoRA run, plus the floor of writing the changed bytes."""
    makers: list[Callable[[str], RunSaver]] = [
        lambda run: ManagerSaver("statevault (incremental)", "default", run, True),
        lambda run: ManagerSaver("statevault incremental=False", "full saves", run, False),
        lambda run: PeerSaver(_peers.TorchSave("cpu"), run),
        lambda run: PeerSaver(_peers.Safetensors("cpu"), run),
        lambda run: PeerSaver(_peers.DCP("cpu"), run),
    ]
    probe = LoraRun(base_bytes)
    probe.step()
    changed, full = probe.changed_bytes(), probe.base_bytes() + probe.changed_bytes()
    changed_buffer = _floors.contiguous_bytes(list(_peers.flatten(probe.tensors()).values()))
    floors = [
        _floors.write_floor(changed_buffer[:changed], os.path.join(base, f"floor{i}"))
        for i in range(SAVES)
    ]
    rows = []
    for index, make in enumerate(makers):
        lora, run = LoraRun(base_bytes), os.path.join(base, f"run{index}")
        saver = make(run)
        seconds, written = [], []
        try:
            for step in range(SAVES):
                lora.step()
                before = inodes(run)
                started = time.perf_counter()
                saver.save(step, lora)
                seconds.append(time.perf_counter() - started)
                written.append(sum(s for i, s in inodes(run).items() if i not in before))
        finally:
            saver.close()
        steady = slice(2, None)  # the first saves write the base (and learn the layout)
        rows.append(
            {
                "what": saver.name,
                "note": saver.note,
                "save_s": statistics.median(seconds[steady]),
                "written": statistics.median(written[steady]),
                "first_written": written[0],
                "run_dir": sum(inodes(run).values()),
            }
        )
        shutil.rmtree(run)
    facts = {
        "base_bytes": probe.base_bytes(),
        "changed_bytes": changed,
        "full_bytes": full,
        "floor_changed_s": statistics.median(floors),
    }
    return rows, facts


# ---- the dense state ---------------------------------------------------------------------------


def dense_rows(base: str, dense_bytes: int, reps: int) -> dict[str, dict[str, list[float]]]:
    """Stall, durable and sync times of a state that changes everywhere, incremental on and off,
    and how many rows of the last incremental save carry a content hash (hashing is what an
    incremental save could add; a dense one hashes nothing)."""
    state = _peers.build_state(dense_bytes, "cpu")
    tensors = list(_peers.tensors_of(state))
    samples: dict[str, dict[str, list[float]]] = {
        name: {"stall": [], "durable": [], "sync": [], "hashed": []} for name in ("on", "off")
    }
    managers = {}
    for name in ("on", "off"):
        for mode in ("async", "sync"):
            run = os.path.join(base, f"dense-{name}-{mode}")
            managers[name, mode] = sv.CheckpointManager(
                run, max_to_keep=2, async_save=mode == "async", incremental=name == "on"
            )
    try:
        for step in range(reps + 1):  # step 0: the first save of each manager, not timed
            order = ("on", "off") if step % 2 else ("off", "on")
            for name in order:
                for tensor in tensors:
                    tensor.add_(1)  # everything changes
                mgr = managers[name, "async"]
                started = time.perf_counter()
                mgr.save(step, state)
                stall = time.perf_counter() - started
                mgr.wait()
                durable = time.perf_counter() - started
                started = time.perf_counter()
                managers[name, "sync"].save(step, state)
                sync = time.perf_counter() - started
                if step:
                    samples[name]["hashed"].append(_hashed_share(mgr, step))
                    samples[name]["stall"].append(stall)
                    samples[name]["durable"].append(durable)
                    samples[name]["sync"].append(sync)
    finally:
        for mgr in managers.values():
            mgr.close()
    return samples


def _hashed_share(mgr: sv.CheckpointManager, step: int) -> float:
    """The share of the checkpoint's bytes whose rows carry a content hash."""
    from statevault.checkpoint.open import open_checkpoint

    with open_checkpoint(os.path.join(mgr.directory, f"step_{step:09d}")) as checkpoint:
        rows = checkpoint.manifest.tensors
        return sum(r.nbytes for r in rows if r.hash is not None) / max(
            1, sum(r.nbytes for r in rows)
        )


# ---- restore after many saves ------------------------------------------------------------------


def restore_rows(base: str, base_bytes: int, reps: int) -> dict[int, float]:
    """Seconds to restore the newest checkpoint after 1, 4 and 16 incremental saves."""
    lora, run = LoraRun(base_bytes), os.path.join(base, "history")
    seconds: dict[int, float] = {}
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        for step in range(1, 17):
            lora.step()
            mgr.save(step, lora.state())
            if step in (1, 4, 16):
                target = LoraRun(base_bytes, seed=1)
                samples = []
                for _ in range(reps + 1):  # the first read warms the page cache
                    started = time.perf_counter()
                    mgr.restore(target.state(), step=step)
                    samples.append(time.perf_counter() - started)
                seconds[step] = statistics.median(samples[1:])
                assert torch.equal(
                    target.base.state_dict()["0.weight"], lora.base.state_dict()["0.weight"]
                )
                assert torch.equal(target.adapters[0].data, lora.adapters[0].data)
    return seconds


# ---- report ------------------------------------------------------------------------------------


def report(
    lora: list[dict[str, Any]],
    facts: dict[str, Any],
    dense: dict[str, dict[str, list[float]]],
    restore: dict[int, float],
    args: argparse.Namespace,
) -> list[str]:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    changed, base_bytes = facts["changed_bytes"], facts["base_bytes"]
    budget = base_bytes + KEEP * changed
    table = Table(
        title=(
            f"LoRA-like run: base {base_bytes / MiB:.1f} MiB frozen, {changed / MiB:.2f} MiB "
            f"changes per step; {SAVES} saves, {KEEP} kept; median of saves 3..{SAVES}"
        ),
        title_justify="left",
    )
    for column in ("what", "s/save", "x floor", "MiB written/save", "x changed"):
        table.add_column(column, justify="left" if column == "what" else "right")
    table.add_column("run dir MiB", justify="right")
    table.add_column("x (base+3 x changed)", justify="right")
    table.add_column("note")
    floor = facts["floor_changed_s"]
    table.add_row(
        "floor: write + fsync the changed bytes", f"{floor:.4f}", "", f"{changed / MiB:.2f}", ""
    )
    for row in lora:
        table.add_row(
            row["what"],
            f"{row['save_s']:.4f}",
            f"{row['save_s'] / floor:.1f}x",
            f"{row['written'] / MiB:.2f}",
            f"{row['written'] / changed:.2f}x",
            f"{row['run_dir'] / MiB:.1f}",
            f"{row['run_dir'] / budget:.2f}x",
            row["note"],
        )
    console.print(table)

    dense_table = Table(
        title=f"dense state ({args.dense_mib} MiB, every tensor changed before each save), "
        f"{args.dense_reps} saves each, incremental on / off in turns",
        title_justify="left",
    )
    columns = ("what", "incremental", "incremental=False", "on / off (paired)", "on / off (min)")
    for column in columns:
        dense_table.add_column(column, justify="left" if column == "what" else "right")
    ratios = {}
    for key, what in (
        ("stall", "async stall"),
        ("durable", "async durable"),
        ("sync", "sync save"),
    ):
        on, off = (statistics.median(dense[n][key]) for n in ("on", "off"))
        best = min(dense["on"][key]) / min(dense["off"][key])
        # Each save with incremental on against the save off next to it: the machine's drift
        # (page cache writeback, neighbours) cancels out of the pair.
        pairs = zip(dense["on"][key], dense["off"][key], strict=True)
        paired = statistics.median(a / b for a, b in pairs)
        ratios[key] = paired
        dense_table.add_row(what, f"{on:.3f} s", f"{off:.3f} s", f"{paired:.3f}x", f"{best:.3f}x")
    dense_table.add_row(
        "bytes with a content hash",
        f"{max(dense['on']['hashed']):.0%}",
        f"{max(dense['off']['hashed']):.0%}",
        "",
        "",
    )
    console.print(dense_table)

    restore_table = Table(title="restore of the newest checkpoint (warm)", title_justify="left")
    for column in ("incremental saves before", "seconds", "x after 1"):
        restore_table.add_column(column, justify="right")
    for count, seconds in restore.items():
        restore_table.add_row(str(count), f"{seconds:.4f}", f"{seconds / restore[1]:.2f}x")
    console.print(restore_table)

    ours = lora[0]
    checks = [
        ("written per save <= 1.1x changed", ours["written"] / changed, WRITTEN_LIMIT),
        ("run dir <= base + 3 x changed x 1.15", ours["run_dir"] / budget, DIR_LIMIT),
        ("dense durable <= 1.05x incremental=False", ratios["durable"], DURABLE_LIMIT),
    ]
    misses = []
    for what, value, limit in checks:
        verdict = "ok" if value <= limit else "MISSED"
        console.print(f"  target {what}: {value:.3f} ({verdict})")
        if value > limit:
            misses.append(what)
    console.print(
        f"  dense stall on/off {ratios['stall']:.3f}x (a dense save hashes nothing); "
        f"restore after 16 saves / after 1: {restore[16] / restore[1]:.2f}x"
    )
    return misses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-mib", type=int, default=64)
    parser.add_argument("--dense-mib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dense-reps", type=int, default=21)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.base_mib, args.dense_mib, args.reps, args.dense_reps = 32, 64, 1, 3
    torch.set_num_threads(1)
    base = tempfile.mkdtemp(prefix="sv-incremental-", dir=args.dir)
    try:
        lora, facts = lora_rows(base, args.base_mib * MiB)
        dense = dense_rows(base, args.dense_mib * MiB, args.dense_reps)
        restore = restore_rows(base, args.base_mib * MiB, args.reps)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    misses = report(lora, facts, dense, restore, args)
    if args.json:
        document = {
            "command": " ".join(sys.argv),
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "torch": torch.__version__,
            "lora": lora,
            "facts": facts,
            "dense": dense,
            "restore": restore,
            "missed": misses,
        }
        with open(args.json, "w") as handle:
            json.dump(document, handle, indent=2)
    return 1 if misses else 0


if __name__ == "__main__":
    raise SystemExit(main())
