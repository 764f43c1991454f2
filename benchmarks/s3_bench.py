"""Save and load through S3: statevault against DCP's fsspec writer/reader, in one run.

    python benchmarks/s3_bench.py                    # 256 MiB state, 3 reps
    python benchmarks/s3_bench.py --size-mib 64 --reps 1

Starts moto's S3 server (``python -m moto.server``) in a separate process on a loopback port,
so that the server does not share the client's interpreter, and talks to it through s3fs as a
user talks to a bucket. The state is the one benchmarks/save_load.py uses (transformer-like
weights plus AdamW moments, as {"model": ..., "optimizer": ...} of CPU tensors). Per rep, each
library saves it to a fresh prefix, then loads it back into preallocated tensors; the loaded
tensors are compared with the state once. Beside them, the floor of this server and client:
one s3fs multipart PUT of the same number of bytes, and one GET of it. Every figure is the
median of ``--reps``. Moto keeps objects in its process's memory: the figures measure the
client, the HTTP path and that server, not a real S3 region.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _peers import build_state, empty_like_tree, equal_trees, flatten  # noqa: E402

import statevault as sv  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """moto's S3 server in a child process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)

    def options(self) -> dict[str, Any]:
        return {
            "key": "bench",
            "secret": "bench",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def filesystem(options: dict[str, Any]) -> Any:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


# ---- the contenders ---------------------------------------------------------------------------


def statevault_save(state: Any, url: str, options: dict[str, Any]) -> None:
    sv.save(state, url, storage_options=options)


def statevault_load(url: str, target: Any, options: dict[str, Any]) -> Any:
    sv.load(url, into=target, storage_options=options)
    return target


def dcp_save(state: Any, url: str, options: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    dcp.save(state, storage_writer=FsspecWriter(url, **options), no_dist=True)


def dcp_load(url: str, target: Any, options: dict[str, Any]) -> Any:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    dcp.load(target, storage_reader=FsspecReader(url, **options), no_dist=True)
    return target


CONTENDERS: dict[str, tuple[Callable[..., None], Callable[..., Any]]] = {
    "statevault": (statevault_save, statevault_load),
    "DCP FsspecWriter/Reader": (dcp_save, dcp_load),
}


# ---- the run ----------------------------------------------------------------------------------


def run(size_mib: int, reps: int, log: Callable[[str], None]) -> dict[str, dict[str, float]]:
    server = Server()
    try:
        options = server.options()
        fs = filesystem(options)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fs.call_s3("create_bucket", Bucket=bucket)
        state = build_state(size_mib << 20, "cpu")
        expected = flatten(state)
        total = sum(t.numel() * t.element_size() for t in expected.values())
        log(f"state: {total / 2**20:.0f} MiB in {len(expected)} tensors; server {server.endpoint}")
        times: dict[str, dict[str, list[float]]] = {}
        for rep in range(reps):
            for name, (save, load) in CONTENDERS.items():
                url = f"s3://{bucket}/{name.split()[0]}-{rep}"
                seconds, _ = timed(lambda: save(state, url, options))  # noqa: B023
                times.setdefault(name, {}).setdefault("save", []).append(seconds)
                target = empty_like_tree(state)
                seconds, loaded = timed(lambda: load(url, target, options))  # noqa: B023
                times[name].setdefault("load", []).append(seconds)
                if rep == 0:
                    problem = equal_trees(expected, loaded)
                    if problem:
                        raise AssertionError(f"{name} loaded something else: {problem}")
                fs.rm(f"{bucket}/{url.rsplit('/', 1)[1]}", recursive=True)
                log(f"rep {rep} {name}: save {times[name]['save'][-1]:.2f} s, load {seconds:.2f} s")
            blob = os.urandom(1 << 20) * (total >> 20)
            key = f"{bucket}/floor-{rep}"
            seconds, _ = timed(lambda: fs.pipe_file(key, blob, chunksize=16 << 20))  # noqa: B023
            times.setdefault("floor", {}).setdefault("save", []).append(seconds)
            seconds, _ = timed(lambda: fs.cat_file(key))  # noqa: B023
            times["floor"].setdefault("load", []).append(seconds)
            fs.rm_file(key)
        return {
            name: {op: statistics.median(values) for op, values in ops.items()}
            for name, ops in times.items()
        } | {"_bytes": {"total": float(total)}}
    finally:
        server.stop()


def table(medians: dict[str, dict[str, float]]) -> str:
    total = medians["_bytes"]["total"]
    mine = medians["statevault"]
    rows = [
        "| S3 (moto, loopback) | statevault | DCP FsspecWriter/Reader | DCP / statevault "
        "| raw s3fs PUT / GET (floor) | statevault / floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    dcp = medians["DCP FsspecWriter/Reader"]
    floor = medians["floor"]
    for op in ("save", "load"):
        rows.append(
            f"| {op} | {mine[op]:.2f} s ({total / mine[op] / 2**20:.0f} MiB/s) "
            f"| {dcp[op]:.2f} s ({total / dcp[op] / 2**20:.0f} MiB/s) "
            f"| {dcp[op] / mine[op]:.2f}x "
            f"| {floor[op]:.2f} s ({total / floor[op] / 2**20:.0f} MiB/s) "
            f"| {mine[op] / floor[op]:.2f}x |"
        )
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="state size (default 256)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median; default 3)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    medians = run(args.size_mib, args.reps, lambda line: print(line, flush=True))
    print()
    print(
        f"{started}, {platform.machine()} {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, statevault {sv.__version__}, "
        f"median of {args.reps}"
    )
    print(table(medians))


if __name__ == "__main__":
    main()
