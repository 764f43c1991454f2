"""Resharding loads from S3: statevault (merged, fetched-ahead requests, and one request per
span for comparison) against DCP's fsspec reader, in one run.

    python benchmarks/s3_reshard_bench.py                      # 64 MiB model + Adam, 3 reps
    python benchmarks/s3_reshard_bench.py --hidden 256 --layers 2 --reps 1

moto's S3 server runs in a child process on a loopback port (benchmarks/s3_bench.py). Two
spawned gloo ranks train an FSDP2 model (benchmarks/distributed_bench.py's blocks) one AdamW
step and save it to S3 with statevault and with DCP (``FsspecWriter``). Then, per rep:

- (after one untimed load by every contender: imports, S3 clients, connections) three spawned
  ranks load it into their own FSDP2 model (``sv.load(into=...)``; DCP:
  ``get_state_dict`` -> ``dcp.load(FsspecReader)`` -> ``set_state_dict``), timed barrier to
  barrier, the max over ranks, each checked bit for bit against the saved full state;
- one process without a process group loads full tensors (``sv.load(url)``; DCP: ``dcp.load``
  into full-size tensors with ``no_dist=True``).

statevault runs twice: as shipped (``PREFETCH_REMOTE`` of checkpoint/read.py) and with the
prefetch off. The
GET requests of the one-process loads are counted (aiobotocore's ``_make_api_call``). Moto keeps
objects in its process's memory: the figures measure the client, the HTTP path and that server,
not a real S3 region, where each round trip costs more and merging matters more.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import distributed_bench as dist_bench  # noqa: E402
import s3_bench  # noqa: E402

import statevault as sv  # noqa: E402
from statevault.checkpoint import read as loading  # noqa: E402

CONTENDERS = ("statevault", "statevault, prefetch off", "DCP")


def _build(args: dict[str, Any]) -> tuple[Any, Any]:
    from torch.distributed.fsdp import fully_shard

    model = dist_bench.build_model(args["hidden"], args["layers"])
    for block in model:
        fully_shard(block)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _full_state(model: Any, opt: Any) -> dict[str, torch.Tensor]:
    """Every tensor of the model and optimizer state, whole (a collective: every rank calls)."""
    return dist_bench.state_tensors(model, opt, _whole)


def _whole(value: Any) -> torch.Tensor:
    full = value.full_tensor() if hasattr(value, "full_tensor") else value
    return full.detach().clone()


def save_ranks(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Rank ``rank`` of the 2-rank save: train one step, save with both libraries."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _build(args)
    x = torch.randn(2, args["hidden"], generator=torch.Generator().manual_seed(rank))
    model(x).square().mean().backward()
    opt.step()
    options = args["options"]
    sv.save({"model": model, "optimizer": opt}, args["sv_url"], storage_options=options)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save(
        {"model": model_sd, "optim": optim_sd},
        storage_writer=FsspecWriter(args["dcp_url"], **options),
    )
    full = _full_state(model, opt)
    if rank == 0:
        torch.save(full, args["reference"])
    return {}


def load_ranks(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Rank ``rank`` of the resharded load: every contender, ``reps`` times, alternating."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = _build(args)
    x = torch.randn(2, args["hidden"], generator=torch.Generator().manual_seed(rank))
    model(x).square().mean().backward()
    opt.step()  # the moments exist, so that every contender has somewhere to load them
    reference = torch.load(args["reference"], weights_only=True)
    options = args["options"]

    def statevault_load(prefetch: bool) -> None:
        loading.PREFETCH_REMOTE = prefetch
        try:
            sv.load(
                args["sv_url"], into={"model": model, "optimizer": opt}, storage_options=options
            )
        finally:
            loading.PREFETCH_REMOTE = True

    def dcp_load() -> None:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, storage_reader=FsspecReader(args["dcp_url"], **options))
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)

    calls: dict[str, Callable[[], None]] = {
        "statevault": functools.partial(statevault_load, True),
        "statevault, prefetch off": functools.partial(statevault_load, False),
        "DCP": dcp_load,
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    exact = dict.fromkeys(calls, True)
    for call in calls.values():  # untimed: imports, S3 clients and connections, for each alike
        call()
    for rep in range(args["reps"]):
        names = list(calls) if rep % 2 == 0 else list(calls)[::-1]
        for name in names:
            _scramble(model, opt)
            dist.barrier()
            started = time.perf_counter()
            calls[name]()
            dist.barrier()
            elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[name].append(float(elapsed.item()))
            exact[name] = exact[name] and _equal(_full_state(model, opt), reference)
    return {"times": times, "exact": exact}


def _scramble(model: Any, opt: Any) -> None:
    with torch.no_grad():
        for value in model.state_dict().values():
            dist_bench._local_ref(value).fill_(7.0)
        for moments in opt.state.values():
            for value in moments.values():
                if isinstance(value, torch.Tensor):
                    dist_bench._local_ref(value).fill_(7.0)


def _equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return set(got) == set(want) and all(
        torch.equal(got[k].view(-1).view(torch.uint8), want[k].view(-1).view(torch.uint8))
        for k in want
    )


@contextmanager
def counted_gets() -> Iterator[list[str]]:
    """The GetObject calls made in this process while the block runs."""
    from aiobotocore.client import AioBaseClient

    original = AioBaseClient._make_api_call
    seen: list[str] = []

    async def counting(self: Any, operation: str, params: dict[str, Any]) -> Any:
        if operation == "GetObject":
            seen.append(str(params.get("Key", "")))
        return await original(self, operation, params)

    AioBaseClient._make_api_call = counting  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        AioBaseClient._make_api_call = original  # type: ignore[method-assign]


def one_process(args: dict[str, Any], reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Full tensors in one process, no process group: times, GET counts, exactness."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    options = args["options"]

    def statevault_load(prefetch: bool) -> dict[str, torch.Tensor]:
        loading.PREFETCH_REMOTE = prefetch
        try:
            loaded = sv.load(args["sv_url"], storage_options=options)
        finally:
            loading.PREFETCH_REMOTE = True
        flat = {f"model/{k}": v for k, v in loaded["model"].items()}
        for index, moments in loaded["optimizer"]["state"].items():
            flat.update({f"opt/{index}/{k}": v for k, v in moments.items()})
        return flat

    def dcp_load() -> dict[str, torch.Tensor]:
        target = {
            "model": {
                k.removeprefix("model/"): torch.empty_like(v)
                for k, v in reference.items()
                if k.startswith("model/")
            },
        }
        dcp.load(target, storage_reader=FsspecReader(args["dcp_url"], **options), no_dist=True)
        return {f"model/{k}": v for k, v in target["model"].items()}

    def statevault_model() -> dict[str, torch.Tensor]:
        loaded = sv.load(args["sv_url"], only="model", storage_options=options)
        return {f"model/{k}": v for k, v in loaded.items()}

    calls = {
        "statevault": functools.partial(statevault_load, True),
        "statevault, prefetch off": functools.partial(statevault_load, False),
        "statevault (model only)": statevault_model,
        "DCP (model only)": dcp_load,
    }
    out: dict[str, Any] = {}
    for call in calls.values():  # untimed warm-up, as in the ranks
        call()
    for name, call in calls.items():
        samples, gets, exact = [], 0, True
        for _ in range(args["reps"]):
            with counted_gets() as seen:
                started = time.perf_counter()
                loaded = call()
                samples.append(time.perf_counter() - started)
            gets = len(seen)
            want = {k: v for k, v in reference.items() if k in loaded}
            exact = exact and bool(want) and _equal(loaded, want)
        out[name] = {"median_s": statistics.median(samples), "gets": gets, "bit_exact": exact}
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512, help="model width (default 512)")
    parser.add_argument("--layers", type=int, default=4, help="blocks (default 4)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median; default 3)")
    parser.add_argument("--timeout", type=float, default=600.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    parsed = parse_args(argv)
    server = s3_bench.Server()
    fs = s3_bench.filesystem(server.options())
    fs.call_s3("create_bucket", Bucket="reshard")
    workdir = tempfile.mkdtemp(prefix="svreshard-")
    args = {
        "hidden": parsed.hidden,
        "layers": parsed.layers,
        "reps": parsed.reps,
        "options": server.options(),
        "sv_url": "s3://reshard/statevault",
        "dcp_url": "s3://reshard/dcp",
        "reference": os.path.join(workdir, "reference.pt"),
    }
    try:
        dist_bench.run_ranks(2, args, parsed.timeout, fn=save_ranks)
        reference = torch.load(args["reference"], weights_only=True)
        state_mib = sum(v.numel() * v.element_size() for v in reference.values()) / (1 << 20)
        print(f"state: {state_mib:.1f} MiB in {len(reference)} tensors, saved by 2 ranks")
        results = dist_bench.run_ranks(3, args, parsed.timeout, fn=load_ranks)
        print(f"\nload into 3 FSDP2 ranks (max over ranks, median of {parsed.reps}):")
        for name in CONTENDERS:
            seconds = statistics.median(results[0]["times"][name])
            exact = all(r["exact"][name] for r in results)
            print(f"  {name:28s} {seconds:7.2f} s   bit-exact: {exact}")
        print(f"\nload into one process (full tensors, median of {parsed.reps}):")
        for name, row in one_process(args, reference).items():
            print(
                f"  {name:28s} {row['median_s']:7.2f} s   {row['gets']:5d} GETs   "
                f"bit-exact: {row['bit_exact']}"
            )
    finally:
        server.stop()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
