"""One short run on a GPU machine: check statevault's CUDA paths, then print the benchmark table.

    python benchmarks/gpu_check.py                          # H100/H200: checks + 6 GiB table
    python benchmarks/gpu_check.py --json "$OUT/gpu.json"   # also keep every figure
    python benchmarks/gpu_check.py --device cpu --size-gib 0.25   # a dry run without a GPU

1. Correctness (PASS/FAIL each; the exit status is 1 if any fails):
   - async save of GPU tensors through CheckpointManager(async_save=True); the tensors are
     mutated on the GPU right after save() returns; after wait() the checkpoint, loaded with
     device="cuda", equals the pre-mutation snapshot bit for bit (two saves: the second reuses
     the pinned staging memory of the first);
   - the same with a staging budget smaller than the state (staged in pieces);
   - sv.load(device="cuda"): every tensor on the GPU, bit-exact;
   - sv.load(into=GPU tensors): the same tensor objects, still on the GPU, bit-exact.
2. The benchmark (benchmarks/save_load.py) with --device cuda --size-gib 6 --reps 3, under a
   soft deadline so that the whole script stays under ~5 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _peers  # noqa: E402
import save_load  # noqa: E402

GiB = 1 << 30
TOTAL_BUDGET_S = 290.0  # the whole script, checks included


def snapshot(state: Any) -> dict[str, torch.Tensor]:
    return {key: t.detach().clone() for key, t in _peers.flatten(state).items()}


def mutate(state: Any) -> None:
    """What a training step does to the state, in place, on the state's device."""
    with torch.no_grad():
        for tensor in _peers.tensors_of(state):
            tensor.add_(1)


def same(expected: dict[str, torch.Tensor], loaded: Any, device: str) -> str | None:
    flat = _peers.flatten(loaded)
    for key, tensor in flat.items():
        if tensor.device.type != device:
            return f"{key} is on {tensor.device}, expected {device}"
    return _peers.equal_trees(expected, flat)


def check_async_mutation(state: Any, directory: str, device: str, budget: int | None) -> str | None:
    import statevault as sv

    load_device = device if device != "cpu" else None
    with sv.CheckpointManager(
        directory,
        async_save=True,
        options=sv.RunOptions(staging_budget_bytes=budget),
        save_on_preemption=False,
    ) as manager:
        manager.restore(into=state)
        for step in (1, 2):
            before = snapshot(state)
            manager.save(step, state, force=True)
            mutate(state)  # right after save() returns, before the save is durable
            manager.wait()
            loaded = sv.load(manager.path(step), device=load_device)
            problem = same(before, loaded, device)
            if problem is not None:
                return f"step {step}: {problem}"
            del loaded, before
    return None


def check_load_to_device(state: Any, directory: str, device: str) -> str | None:
    import statevault as sv

    expected = snapshot(state)
    sv.save(state, directory)
    loaded = sv.load(directory, device=device if device != "cpu" else None)
    return same(expected, loaded, device)


def check_load_into(state: Any, directory: str, device: str) -> str | None:
    import statevault as sv

    expected = snapshot(state)
    sv.save(state, directory)
    targets = _peers.empty_like_tree(state)
    before = {key: id(t) for key, t in _peers.flatten(targets).items()}
    sv.load(directory, into=targets)
    after = _peers.flatten(targets)
    if any(id(after[key]) != ident for key, ident in before.items()):
        return "load(into=) replaced target tensors instead of filling them"
    return same(expected, targets, device)


def run_checks(device: str, size_gib: float, base: str) -> bool:
    state = _peers.build_state(int(size_gib * GiB), device, seed=1)
    state_bytes = _peers.nbytes(list(_peers.tensors_of(state)))
    checks: list[tuple[str, Callable[[], str | None]]] = [
        (
            "async save, mutate after save() returns, load bit-exact",
            lambda: check_async_mutation(state, os.path.join(base, "run"), device, None),
        ),
        (
            "async save staged in pieces (budget < state), mutate, load bit-exact",
            lambda: check_async_mutation(
                state, os.path.join(base, "run-budget"), device, state_bytes // 3
            ),
        ),
        (
            f"sv.load(device={device!r}) bit-exact, on the device",
            lambda: check_load_to_device(state, os.path.join(base, "sync"), device),
        ),
        (
            f"sv.load(into={device} tensors) fills them in place, bit-exact",
            lambda: check_load_into(state, os.path.join(base, "into"), device),
        ),
    ]
    ok = True
    print(f"checks on {device} with a {state_bytes / GiB:.2f} GiB state:", flush=True)
    for name, function in checks:
        started = time.perf_counter()
        try:
            problem = function()
        except Exception:
            problem = traceback.format_exc().strip().splitlines()[-1]
            traceback.print_exc()
        elapsed = time.perf_counter() - started
        verdict = "PASS" if problem is None else f"FAIL: {problem}"
        print(f"  {verdict:6s} {name} ({elapsed:.1f} s)", flush=True)
        ok = ok and problem is None
    if device == "cuda":
        torch.cuda.empty_cache()
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size-gib", type=float, default=6.0, help="benchmark state size")
    parser.add_argument("--check-size-gib", type=float, default=1.0, help="checks' state size")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="parent of the scratch dirs ($TMPDIR)")
    parser.add_argument("--json", default=None, metavar="OUT", help="benchmark figures here")
    parser.add_argument("--skip-bench", action="store_true", help="only the checks")
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="whole script")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("FAIL: --device cuda but torch sees no CUDA device", flush=True)
            return 1
        props = torch.cuda.get_device_properties(0)
        print(
            f"device: {props.name}, {props.total_memory / GiB:.0f} GiB, "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}",
            flush=True,
        )
    base = tempfile.mkdtemp(prefix="statevault-gpu-check-", dir=args.dir)
    try:
        ok = run_checks(args.device, min(args.check_size_gib, args.size_gib), base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"checks: {'PASS' if ok else 'FAIL'} ({time.perf_counter() - started:.0f} s)")
    if args.skip_bench:
        return 0 if ok else 1
    bench_args = [
        "--device",
        args.device,
        "--size-gib",
        f"{args.size_gib:g}",
        "--reps",
        str(args.reps),
        "--deadline-s",
        f"{max(60.0, args.budget_s - (time.perf_counter() - started)):.0f}",
        "--no-cold",  # cold loads of 6 GiB per loader do not fit the device time of one run
    ]
    if args.dir:
        bench_args += ["--dir", args.dir]
    if args.json:
        bench_args += ["--json", args.json]
    try:
        save_load.main(bench_args)
    except Exception:
        traceback.print_exc()
        print("FAIL: the benchmark raised", flush=True)
        return 2
    print(
        f"gpu_check total {time.perf_counter() - started:.0f} s; checks {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
