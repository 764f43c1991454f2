"""Save and load timings of statevault against its peers and the physical floors, in one run.

    python benchmarks/save_load.py                        # 1 GiB state on the CPU, 3 reps
    python benchmarks/save_load.py --quick                # 0.25 GiB smoke run, 1 rep
    python benchmarks/save_load.py --device cuda --size-gib 6 --json out.json

The state is transformer-like: fp32 weights (plus a few bf16 tensors) and AdamW moments of the
same shapes (weights ~1/3 of the bytes, moments ~2/3), as {"model": {...}, "optimizer": {...}}
of plain tensors on the chosen device. Every figure is the median of ``--reps`` repetitions,
each into a fresh directory that is deleted afterwards. Loads are timed twice: warm (the files
read once before) and cold (each file's page cache pages dropped with ``posix_fadvise`` before
every load; ``--no-cold`` skips these), and every loaded tensor is touched inside the timing so
that a lazy memory map is not counted as free. See benchmarks/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import statevault  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import _floors  # noqa: E402
import _peers  # noqa: E402

GiB = 1 << 30

# Targets of issue 7, as (what, limit). CUDA limits differ for the stall.
STALL_LIMIT = {"cpu": 1.5, "cuda": 1.2}
SYNC_LIMIT = 1.15
DURABLE_LIMIT = 1.2
LOAD_LIMIT = 1.2


# ---- rows ------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    what: str
    group: str  # floor | save | stall | durable | load | cold
    times: list[float] = field(default_factory=list)
    floor: str | None = None  # write | copy | read | read_cold (| read_h2d on CUDA)
    note: str = ""
    error: str | None = None
    peak_extra_bytes: int | None = None

    @property
    def seconds(self) -> float | None:
        return statistics.median(self.times) if self.times else None


@dataclass
class Bench:
    args: argparse.Namespace
    base: str
    state: dict[str, Any]
    device: str
    rows: list[Row] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    deadline: float | None = None  # time.perf_counter() value; see --deadline-s

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    def row(self, key: str) -> Row | None:
        return next((r for r in self.rows if r.key == key), None)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def floor_seconds(self, name: str | None) -> float | None:
        if name is None:
            return None
        row = self.row(f"floor.{name}")
        return row.seconds if row is not None else None

    def ratio(self, row: Row) -> float | None:
        floor = self.floor_seconds(row.floor)
        seconds = row.seconds
        if floor is None or seconds is None or floor <= 0:
            return None
        return seconds / floor

    def fresh(self, name: str) -> str:
        return os.path.join(self.base, name)


def remove(path: str | None) -> None:
    if path and os.path.lexists(path):
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- sections --------------------------------------------------------------------------------


class Floors:
    """Floor samples, taken throughout the run so that they see the machine the rows see.

    Write samples open every round of sync saves, a read sample precedes every group of loads,
    and a copy sample precedes every async save; each floor row is the median of its samples.
    """

    def __init__(self, bench: Bench, log: Callable[[str], None]) -> None:
        self.bench = bench
        self.tensors = list(_peers.tensors_of(bench.state))
        self.state_bytes = _peers.nbytes(self.tensors)
        self.buffer = _floors.contiguous_bytes(self.tensors)
        self.raw: str | None = None
        self.rounds = 0
        cuda = bench.device == "cuda"
        self.write = bench.add(Row("floor.write", "raw write floor", "floor", floor="write"))
        self.write.note = "one contiguous buffer, sequential 16 MiB writes + fsync, fresh file"
        self.direct = bench.add(Row("ref.direct_write", "raw O_DIRECT write (reference)", "floor"))
        self.direct.note = (
            "reference, not a floor: the same write with O_DIRECT (no page cache), + fsync; "
            "sampled beside every write floor sample"
        )
        label = "pinned D2H copy floor" if cuda else "memcpy floor"
        self.copy = bench.add(Row("floor.copy", label, "floor", floor="copy"))
        self.copy.note = (
            "every tensor into preallocated pinned buffers, one synchronize"
            if cuda
            else "every tensor into preallocated, already-faulted host buffers, one thread"
        )
        self.read = bench.add(Row("floor.read", "raw read floor", "floor", floor="read"))
        self.read.note = "raw file into a preallocated buffer; page cache warm"
        self.cold: Row | None = None
        if bench.args.cold:
            self.cold = bench.add(
                Row("floor.read_cold", "raw read floor, cold", "floor", floor="read_cold")
            )
            self.cold.note = "the same read after dropping the file's page cache pages"
        self.h2d: Row | None = None
        if cuda:
            self.h2d = bench.add(
                Row("floor.read_h2d", "raw read + H2D floor", "floor", floor="read_h2d")
            )
            self.h2d.note = "raw file into pinned memory, one copy to a device buffer; warm"
            self.pinned, self.device_buffer = _floors.h2d_targets(self.buffer, bench.device)
        # Warm-up, untimed: the first large write or copy of a process (page cache growth, a
        # VM's first touch of memory) can be much slower than the next.
        warm = bench.fresh("warmup.raw")
        _floors.write_floor(self.buffer, warm)
        remove(warm)
        self.targets = _floors.copy_targets(self.tensors)
        _floors.copy_floor(self.tensors, self.targets)
        for _ in range(bench.args.reps):
            self.copy_sample()
        if not cuda:
            threads = torch.get_num_threads()
            ref = bench.add(Row("ref.torch_copy", f"torch copy_ ({threads} threads)", "floor"))
            ref.note = "reference, not a floor: the same copy through torch's intra-op threads"
            ref.times = [
                _floors.torch_copy(self.tensors, self.targets) for _ in range(bench.args.reps)
            ]
        touched = bench.add(Row("ref.touch", f"touch ({bench.args.touch}) of the state", "floor"))
        touched.note = "reference, not a floor: what every load row adds to touch its tensors"
        touched.times = [
            _floors.timed(lambda: _peers.touch(bench.state, bench.args.touch))
            for _ in range(bench.args.reps)
        ]
        fault = bench.add(Row("ref.fault_in", "fresh-memory fault-in", "floor"))
        fault.note = "reference, not a floor: allocate the state's size and touch every page"
        fault.times = [_floors.fault_in(self.state_bytes) for _ in range(bench.args.reps)]
        log(f"copy floor {self.copy.seconds:.3f} s, fault-in {fault.seconds:.3f} s")

    def write_sample(self) -> None:
        # The previous raw file goes first, as every checkpoint goes right after it is timed:
        # a write that must take page cache pages the kernel has not just freed can be several
        # times slower on a VM that hands free memory back to its host (the development VM).
        remove(self.raw)
        path = self.bench.fresh(f"raw-{self.rounds}")
        self.rounds += 1
        if self.direct.error is None and self.rounds % 2 == 0:  # alternate which goes first
            self.direct_sample()
        self.write.times.append(_floors.write_floor(self.buffer, path))
        self.raw = path
        if self.direct.error is None and self.rounds % 2 == 1:
            self.direct_sample()

    def direct_sample(self) -> None:
        path = self.bench.fresh(f"direct-{self.rounds}")
        try:
            self.direct.times.append(_floors.direct_write(self.buffer, path))
        except OSError as exc:
            self.direct.error, self.direct.times = f"O_DIRECT refused here: {exc}", []
        finally:
            remove(path)

    def read_sample(self) -> None:
        assert self.raw is not None
        self.read.times.append(_floors.read_floor(self.raw, self.buffer))
        if self.h2d is not None:
            self.h2d.times.append(_floors.read_h2d_floor(self.raw, self.pinned, self.device_buffer))

    def cold_read_sample(self) -> None:
        assert self.raw is not None and self.cold is not None
        _floors.evict(self.raw)
        self.bench.facts.setdefault("resident_after_evict", []).append(
            _floors.resident_fraction(self.raw)
        )
        self.cold.times.append(_floors.read_floor(self.raw, self.buffer))

    def copy_sample(self) -> None:
        self.copy.times.append(_floors.copy_floor(self.tensors, self.targets))

    def close(self) -> None:
        remove(self.raw)
        self.raw = None
        for row in (self.write, self.direct, self.copy, self.read, self.cold, self.h2d):
            if row is not None:
                row.note += f" ({len(row.times)} samples)"
        del self.buffer, self.targets
        if self.h2d is not None:
            del self.pinned, self.device_buffer
        gc.collect()


@dataclass
class SyncPeer:
    key: str
    peer: _peers.Peer
    loads: list[tuple[str, str, _peers.Peer]]
    row: Row | None = None
    failed: bool = False


def run_sync(
    bench: Bench, floors: Floors, peers: list[SyncPeer], log: Callable[[str], None]
) -> None:
    """R rounds; each: a write-floor sample, then one save per peer (order rotated per round).

    The last round keeps each checkpoint just long enough to time its loads, so that at most
    two copies of the state sit on disk (the raw file and one checkpoint).
    """
    floor = "read_h2d" if bench.device == "cuda" else "read"
    load_rows: dict[str, Row] = {}
    cold_rows: dict[str, Row] = {}
    for peer in peers:  # rows first, in this order, whatever order the rounds run in
        peer.row = bench.add(
            Row(f"save.{peer.key}", peer.peer.name, "save", floor="write", note=peer.peer.note)
        )
    for peer in peers:
        for load_key, what, loader in peer.loads:
            note = getattr(loader, "load_note", "")
            load_rows[load_key] = bench.add(
                Row(f"load.{load_key}", what, "load", floor=floor, note=note)
            )
    for peer in peers if bench.args.cold else []:
        for load_key, what, loader in peer.loads:
            note = getattr(loader, "load_note", "")
            cold_rows[load_key] = bench.add(
                Row(f"cold.{load_key}", what, "cold", floor="read_cold", note=note)
            )
    for peer in peers:
        try:
            peer.peer.setup(bench.state)
        except Exception as exc:
            peer.row.error, peer.failed = error_text(exc), True
    reps = bench.args.reps
    rounds_started = time.perf_counter()
    for rep in range(reps):
        last = rep == reps - 1
        if rep and not last:
            # --deadline-s: this round, its loads and the async sections take about
            # (rounds left + 2.5) times what a round has taken so far; if that does not fit,
            # this round is the last.
            per_round = (time.perf_counter() - rounds_started) / rep
            if per_round * (reps - rep + 2.5) > bench.time_left():
                last = True
                bench.facts["sync_rounds_cut_to"] = rep + 1
                log(f"--deadline-s: {rep + 1} rounds of sync saves instead of {reps}")
        floors.write_sample()
        order = peers[rep % len(peers) :] + peers[: rep % len(peers)]
        for peer in order:
            if peer.failed:
                continue
            path = save_once(bench, peer, rep)
            if path is None:
                continue
            if last:
                _floors.warm_page_cache(path)  # every loader alike: loads are warm-cache loads
                floors.read_sample()
                for load_key, _what, loader in peer.loads:
                    run_loads(bench, loader, load_rows[load_key], path, log)
                if cold_rows and peer.loads:
                    floors.cold_read_sample()
                for load_key, _what, loader in peer.loads if cold_rows else []:
                    run_loads(bench, loader, cold_rows[load_key], path, log, cold=True)
            remove(path)
        if last:
            break
    for peer in peers:
        if peer.failed:
            for load_key, _what, _loader in peer.loads:
                load_rows[load_key].error = "no checkpoint to load: its save failed"
                if load_key in cold_rows:
                    cold_rows[load_key].error = "no checkpoint to load: its save failed"
        try:
            peer.peer.close()
        except Exception as exc:
            log(f"{peer.peer.name}: close failed: {error_text(exc)}")
        assert peer.row is not None
        log(f"{peer.peer.name}: {peer.row.error or peer.row.seconds}")


def save_once(bench: Bench, peer: SyncPeer, rep: int) -> str | None:
    """One timed save into a fresh directory; returns where it went (None if it failed)."""
    row = peer.row
    assert row is not None
    path = bench.fresh(f"{peer.key}-{rep}")
    gc.collect()
    try:
        with _floors.PeakRSS() as memory:
            timing = peer.peer.save(bench.state, path)
    except Exception as exc:
        row.error, row.times, peer.failed = error_text(exc), [], True
        remove(path)
        return None
    row.times.append(timing.total)
    row.peak_extra_bytes = max(row.peak_extra_bytes or 0, memory.extra)
    return timing.written or path


def run_loads(
    bench: Bench,
    peer: _peers.Peer,
    row: Row,
    path: str,
    log: Callable[[str], None],
    cold: bool = False,
) -> None:
    """R timed loads (each with every tensor touched), then a bit-exact check of the last;
    ``cold``: the checkpoint's files are dropped from the page cache before each load."""
    note = row.note
    expected = _peers.flatten(bench.state)
    try:
        target = peer.load_target(bench.state)
        loaded: Any = None
        for _ in range(bench.args.reps):
            loaded = None
            gc.collect()
            if cold:
                _floors.evict(path)
            started = time.perf_counter()
            loaded = peer.load(path, target)
            _peers.touch(loaded, bench.args.touch)
            row.times.append(time.perf_counter() - started)
        problem = _peers.equal_trees(expected, loaded)
        row.note = f"{note}; " if note else ""
        row.note += "bit-exact" if problem is None else f"MISMATCH: {problem}"
        del loaded, target
    except Exception as exc:
        row.error = error_text(exc)
        row.times = []
    log(f"{row.what}: {row.seconds if row.error is None else row.error}")


def run_async(
    bench: Bench,
    floors: Floors,
    peer: _peers.Peer,
    key: str,
    log: Callable[[str], None],
) -> None:
    """1 + R saves: the first is reported alone, the median of the R later ones beside it."""
    stall = bench.add(
        Row(f"stall.{key}", f"{peer.name}: stall", "stall", floor="copy", note=peer.note)
    )
    durable = bench.add(Row(f"durable.{key}", f"{peer.name}: durable", "durable", floor="write"))
    first_stall = bench.add(Row(f"stall.{key}.first", "  first save: stall", "stall", floor="copy"))
    first_durable = bench.add(
        Row(f"durable.{key}.first", "  first save: durable", "durable", floor="write")
    )
    gap = bench.args.first_save_gap
    written: str | None = None
    try:
        gc.collect()
        floors.copy_sample()  # before setup: a background prewarm would contend with it
        with _floors.PeakRSS() as memory:
            peer.setup(bench.state)
            time.sleep(gap)  # stands for the training steps between restore and a first save
            for rep in range(bench.args.reps + 1):
                # --deadline-s: a peer's later saves stop once 3 more would not fit.
                peer_row = not isinstance(peer, _peers.StatevaultAsync)
                if peer_row and rep > 1 and 3 * durable.times[-1] > bench.time_left():
                    durable.note = f"cut to {rep - 1} later saves by --deadline-s; "
                    break
                if rep:
                    floors.copy_sample()
                timing = peer.save(bench.state, bench.fresh(f"{key}-{rep}"))
                written = timing.written or bench.fresh(f"{key}-{rep}")
                assert timing.stall is not None
                if rep == 0:
                    first_stall.times.append(timing.stall)
                    first_durable.times.append(timing.total)
                else:
                    stall.times.append(timing.stall)
                    durable.times.append(timing.total)
                remove(written)
                written = None
        durable.peak_extra_bytes = memory.extra
        first_stall.note = f"issued {gap:g} s after setup"
        if stall.times:
            durable.note += f"later saves: stall max {max(stall.times):.3f} s"
        if isinstance(peer, _peers.StatevaultAsync):
            prewarm = peer.prewarm_seconds()
            staging = peer.staging_bytes()
            if prewarm is not None:
                first_stall.note += f"; its prewarm ended {prewarm:.2f} s after restore()"
            if staging is not None:
                first_durable.note = f"staging arena {staging / GiB:.2f} GiB"
            bench.facts["statevault_prewarm_s"] = prewarm
            bench.facts["statevault_staging_bytes"] = staging
    except Exception as exc:
        for row in (stall, durable, first_stall, first_durable):
            row.times = []
        stall.error = error_text(exc)
        remove(written)
    finally:
        try:
            peer.close()
        except Exception as exc:
            stall.error = stall.error or f"close: {error_text(exc)}"
    log(f"{peer.name}: stall {stall.seconds} durable {durable.seconds} (first {first_stall.times})")


# ---- the run ---------------------------------------------------------------------------------


def machine_info(device: str, directory: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "ram_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "filesystem": _filesystem(directory),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }
    for package in ("statevault", "safetensors", "torch_checkpointing"):
        try:
            module = __import__(package)
            info[package] = getattr(module, "__version__", "?")
        except ImportError:
            info[package] = None
    info["git"] = _git_revision()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _filesystem(directory: str) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) > 2 and directory.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], f"{parts[2]} on {parts[0]} ({parts[1]})"
    except OSError:
        pass
    return kind


def _git_revision() -> str | None:
    try:
        root = os.path.dirname(HERE)
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"{rev}{' (uncommitted changes)' if dirty else ''}" if rev else None
    except OSError:
        return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=None, help="state size (default 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--dir", default=None, help="parent of the scratch dir (default: $TMPDIR)")
    parser.add_argument("--quick", action="store_true", help="0.25 GiB, 1 rep: a smoke run")
    parser.add_argument("--json", default=None, metavar="OUT", help="write all figures here")
    parser.add_argument(
        "--touch",
        choices=["sum", "page"],
        default="sum",
        help="how loads touch tensors: a pass over every byte (default) or one byte per page",
    )
    parser.add_argument(
        "--no-cold",
        dest="cold",
        action="store_false",
        help="skip the cold loads (each checkpoint's page cache dropped before each load)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="soft time limit: fewer repetitions of the peers' saves when it would be passed",
    )
    parser.add_argument(
        "--first-save-gap",
        type=float,
        default=2.0,
        help="seconds between an async saver's setup (statevault: restore) and its first save",
    )
    args = parser.parse_args(argv)
    if args.size_gib is None:
        args.size_gib = 0.25 if args.quick else 1.0
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.reps < 1 or args.size_gib <= 0:
        parser.error("--reps and --size-gib must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables, return every figure (as ``--json`` writes it)."""
    from rich.console import Console

    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv_list)
    console = Console(width=max(140, Console().width))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    command = shlex.join(["python", "benchmarks/save_load.py", *argv_list])
    started = time.perf_counter()
    base = tempfile.mkdtemp(prefix="statevault-bench-", dir=args.dir)

    def log(message: str) -> None:
        console.log(message, highlight=False, markup=False)

    try:
        log(f"building a {args.size_gib:g} GiB state on {args.device}")
        state = _peers.build_state(int(args.size_gib * GiB), args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        bench = Bench(args, base, state, args.device)
        if args.deadline_s is not None:
            bench.deadline = started + args.deadline_s
        tensors = list(_peers.tensors_of(state))
        bench.facts.update(
            state_bytes=_peers.nbytes(tensors),
            tensors=len(tensors),
            weight_bytes=_peers.nbytes(list(_peers.tensors_of(state["model"]))),
            loadavg_start=os.getloadavg(),
        )
        run_all(bench, log)
        bench.facts["loadavg_end"] = os.getloadavg()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results = report(bench, console, command, machine_info(args.device, base), started)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        log(f"figures written to {args.json}")
    return results


def run_all(bench: Bench, log: Callable[[str], None]) -> None:
    device = bench.device
    missing_tc = _peers.torch_checkpointing_missing()
    with _peers.quiet_warnings():
        floors = Floors(bench, log)
        direct_io = False  # torch-checkpointing's O_DIRECT default, kept where it works
        if missing_tc is None:
            probe = _peers.probe_torch_checkpointing_direct_io(bench.fresh("probe"))
            remove(bench.fresh("probe"))
            bench.facts["torch_checkpointing_default_o_direct"] = probe
            direct_io = probe == "works"
        sv_note = "device='cuda'" if device == "cuda" else ""
        peers = [
            SyncPeer(
                "torch_save",
                _peers.TorchSave(device),
                [("torch_load", "torch.load", _peers.TorchSave(device))],
            ),
            SyncPeer(
                "safetensors",
                _peers.Safetensors(device),
                [("safetensors", "safetensors load_file", _peers.Safetensors(device))],
            ),
            SyncPeer("dcp", _peers.DCP(device), [("dcp", "DCP load", _peers.DCP(device))]),
        ]
        if missing_tc is None:
            tc = _peers.TorchCheckpointing(device, asynchronous=False, direct_io=direct_io)
            peers.append(
                SyncPeer(
                    "torch_checkpointing",
                    tc,
                    [("torch_checkpointing", "torch-checkpointing load", tc)],
                )
            )
        peers.append(
            SyncPeer(
                "statevault",
                _peers.StatevaultSync(device, note=sv_note),
                [
                    (
                        "statevault",
                        "statevault sv.load (verify=True)",
                        _peers.StatevaultSync(device, note=sv_note),
                    ),
                    (
                        "statevault_noverify",
                        "statevault sv.load (verify=False)",
                        _peers.StatevaultSync(device, verify=False, note=sv_note),
                    ),
                    ("statevault_into", _peers.StatevaultInto.name, _peers.StatevaultInto()),
                ],
            )
        )
        peers.append(SyncPeer("statevault_buffered", _peers.StatevaultBuffered(device), []))
        if missing_tc is not None:
            for key, what, group in (
                ("save.torch_checkpointing", "torch-checkpointing sync", "save"),
                ("load.torch_checkpointing", "torch-checkpointing load", "load"),
                ("stall.tc_async", "torch-checkpointing async", "stall"),
            ):
                bench.add(Row(key, what, group, error=missing_tc))
        run_sync(bench, floors, peers, log)
        run_async(bench, floors, _peers.DCPAsync(), "dcp_async", log)
        if missing_tc is None:
            tc_async = _peers.TorchCheckpointing(device, True, direct_io=direct_io)
            run_async(bench, floors, tc_async, "tc_async", log)
        run_async(
            bench, floors, _peers.StatevaultAsync(bench.fresh("sv-run")), "statevault_async", log
        )
        floors.close()


# ---- the report ------------------------------------------------------------------------------

FLOOR_NAMES = {
    "write": "write floor",
    "copy": "copy floor",
    "read": "read floor",
    "read_cold": "cold read floor",
    "read_h2d": "read+H2D floor",
}


def targets(bench: Bench) -> list[dict[str, Any]]:
    """Every statevault target of issue 7, measured against the floors of this run."""
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float | None, shown: str) -> None:
        ok = None if value is None or limit is None else value <= limit
        checks.append({"target": name, "measured": shown, "value": value, "pass": ok})

    def ratio_of(key: str) -> float | None:
        row = bench.row(key)
        return bench.ratio(row) if row is not None and row.error is None else None

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}x"

    sync = ratio_of("save.statevault")
    check(f"sync save <= {SYNC_LIMIT}x write floor", sync, SYNC_LIMIT, fmt(sync))
    direct = bench.row("ref.direct_write")
    sv_sync = bench.row("save.statevault")
    if direct is not None and direct.seconds and sv_sync is not None and sv_sync.seconds:
        value = sv_sync.seconds / direct.seconds
        check("(no target) sync save vs the raw O_DIRECT write", value, None, fmt(value))
    buffered = ratio_of("save.statevault_buffered")
    check("(no target) sync save, O_DIRECT off, vs write floor", buffered, None, fmt(buffered))
    sv = bench.row("save.statevault")
    peers = [
        r
        for r in bench.rows
        if r.group == "save" and not r.key.startswith("save.statevault") and r.seconds is not None
    ]
    if sv is not None and sv.seconds is not None and peers:
        fastest = min(peers, key=lambda r: r.seconds or 0.0)
        assert fastest.seconds is not None
        checks.append(
            {
                "target": "sync save faster than every peer's sync save",
                "measured": f"{sv.seconds:.3f} s vs fastest peer {fastest.what} "
                f"{fastest.seconds:.3f} s",
                "value": sv.seconds / fastest.seconds,
                "pass": sv.seconds < fastest.seconds,
            }
        )
    limit = STALL_LIMIT[bench.device]
    copy_floor = bench.floor_seconds("copy")
    first = bench.row("stall.statevault_async.first")
    later = bench.row("stall.statevault_async")
    if first is not None and first.times and copy_floor:
        value = first.times[0] / copy_floor
        check(f"async stall, first save <= {limit}x copy floor", value, limit, fmt(value))
    if later is not None and later.times and copy_floor:
        worst = max(later.times) / copy_floor
        check(
            f"async stall, every later save <= {limit}x copy floor",
            worst,
            limit,
            f"{fmt(worst)} (worst of {len(later.times)}; median {fmt(bench.ratio(later))})",
        )
    durable = ratio_of("durable.statevault_async")
    check(f"async durable <= {DURABLE_LIMIT}x write floor", durable, DURABLE_LIMIT, fmt(durable))
    first_durable = ratio_of("durable.statevault_async.first")
    check(
        f"async durable, first save <= {DURABLE_LIMIT}x write floor",
        first_durable,
        DURABLE_LIMIT,
        fmt(first_durable),
    )
    load = bench.row("load.statevault")
    if bench.device == "cpu":
        value = ratio_of("load.statevault")
        check(f"load (verify=True) <= {LOAD_LIMIT}x read floor", value, LOAD_LIMIT, fmt(value))
    st = bench.row("load.safetensors")
    if load is not None and st is not None and load.seconds and st.seconds:
        checks.append(
            {
                "target": "load no slower than safetensors (tensors touched)",
                "measured": f"{load.seconds:.3f} s vs {st.seconds:.3f} s",
                "value": load.seconds / st.seconds,
                "pass": load.seconds <= st.seconds,
            }
        )
    if bench.row("cold.statevault") is not None:
        cold = ratio_of("cold.statevault")
        check("(no target) cold load (verify=True) vs cold read floor", cold, None, fmt(cold))
    return checks


def _resident(values: Sequence[float] | None) -> str:
    return "not measured" if not values else f"{max(values):.1%} of the pages at most"


def _loadavg(values: Sequence[float] | None) -> str:
    return "?" if not values else "/".join(f"{v:.1f}" for v in values)


def report(
    bench: Bench,
    console: Any,
    command: str,
    machine: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    from rich.table import Table
    from rich.text import Text

    args = bench.args
    state_bytes = bench.facts["state_bytes"]
    weights = bench.facts["weight_bytes"] / state_bytes
    title = (
        f"statevault save/load: {state_bytes / GiB:.2f} GiB state "
        f"({bench.facts['tensors']} tensors, weights {weights:.0%} of the bytes) "
        f"on {bench.device}, median of {args.reps}"
    )
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("what")
    table.add_column("seconds", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("vs", style="dim")
    table.add_column("note", overflow="fold")
    groups = [
        ("floor", "floors"),
        ("save", "sync saves (durable)"),
        ("async", "async saves (stall: until training may mutate the state; durable: fsynced)"),
        ("load", f"loads (warm page cache; tensors touched: {args.touch})"),
        (
            "cold",
            "cold loads (the checkpoint's page cache dropped before each load; tensors "
            f"touched: {args.touch})",
        ),
    ]
    for group, heading in groups:
        if group == "cold" and not any(row.group == "cold" for row in bench.rows):
            continue  # --no-cold
        table.add_section()
        table.add_row(f"[bold]{heading}[/bold]", "", "", "", "")
        for row in bench.rows:
            in_group = row.group in ("stall", "durable") if group == "async" else row.group == group
            if not in_group:
                continue
            ratio = bench.ratio(row)
            if row.error is not None:
                table.add_row(Text(row.what), Text("error", "red"), "", "", Text(row.error, "red"))
                continue
            table.add_row(
                Text(row.what),
                f"{row.seconds:.3f}" if row.seconds is not None else "",
                f"{ratio:.2f}x" if ratio is not None and row.group != "floor" else "",
                FLOOR_NAMES.get(row.floor or "", "") if row.group != "floor" else "",
                Text(row.note),
            )
    console.print(table)

    memory = Table(title="peak extra host memory (this process's RSS, sampled every 5 ms)")
    memory.title_justify = "left"
    memory.add_column("what")
    memory.add_column("GiB", justify="right")
    memory.add_column("x state", justify="right")
    memory.add_column("note")
    for row in bench.rows:
        if row.peak_extra_bytes is None:
            continue
        note = ""
        if row.key == "durable.statevault_async":
            note = "setup (restore + prewarm) and every save, vs RSS before the manager existed"
        elif row.key.endswith("_async"):
            note = "setup and every save"
        elif row.group == "save":
            note = "worst save, vs RSS just before the call"
        if row.key.startswith("durable.tc_async"):
            note += "; its writer is a child process (not counted)"
        memory.add_row(
            Text(row.what.removesuffix(": durable")),
            f"{row.peak_extra_bytes / GiB:.2f}",
            f"{row.peak_extra_bytes / state_bytes:.2f}",
            note,
        )
    console.print(memory)

    checks = targets(bench)
    verdicts = Table(title="issue 7 targets (statevault)", title_justify="left")
    verdicts.add_column("target")
    verdicts.add_column("measured")
    verdicts.add_column("verdict")
    for item in checks:
        verdict = {True: "[green]PASS[/green]", False: "[red]MISS[/red]", None: "n/a"}
        verdicts.add_row(Text(item["target"]), Text(item["measured"]), verdict[item["pass"]])
    console.print(verdicts)

    elapsed = time.perf_counter() - started
    probe = bench.facts.get("torch_checkpointing_default_o_direct")
    lines = [
        f"command: {command}",
        "machine: "
        + ", ".join(
            f"{k}={v}"
            for k, v in machine.items()
            if k in ("cpu_count", "cpu", "ram_gib", "device", "torch", "filesystem", "git")
        ),
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "warm loads: files read once before"
        + (
            "; cold loads: each file's pages dropped (fsync + posix_fadvise DONTNEED) before "
            "every load; resident after a drop: "
            + _resident(bench.facts.get("resident_after_evict"))
            if args.cold
            else ""
        ),
        "load average (1, 5, 15 min) at start {} and end {} on {} CPUs{}".format(
            _loadavg(bench.facts.get("loadavg_start")),
            _loadavg(bench.facts.get("loadavg_end")),
            os.cpu_count(),
            ": OTHER WORK WAS RUNNING, figures are noisy"
            if max(
                bench.facts.get("loadavg_start", (0,))[0], bench.facts.get("loadavg_end", (0,))[0]
            )
            > 0.5 * (os.cpu_count() or 1)
            else "",
        ),
    ]
    if probe is not None:
        lines.append(f"torch-checkpointing default writer (O_DIRECT on) here: {probe}")
    lines.append(f"total runtime {elapsed:.0f} s")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True, markup=False)

    return {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine,
        "args": vars(args),
        "facts": bench.facts,
        "rows": [
            {
                "key": r.key,
                "what": r.what,
                "group": r.group,
                "times_s": r.times,
                "median_s": r.seconds,
                "floor": r.floor,
                "ratio": bench.ratio(r),
                "note": r.note,
                "error": r.error,
                "peak_extra_bytes": r.peak_extra_bytes,
            }
            for r in bench.rows
        ],
        "targets": checks,
        "runtime_s": elapsed,
    }


if __name__ == "__main__":
    main()
