"""Workloads that tests run in subprocesses: a crash-save loop and a small training run.

Run as a script (``python tests/workloads.py MODE ...``) or as a module
(``python -m tests.workloads MODE ...``); it imports only statevault, torch and numpy, so the
script form works from any working directory. Modes:

``crash-server``
    A fork server for tests/test_crash_safety.py. It imports torch and statevault once, then for
    each line ``run <run_dir> <first_counter>`` read from stdin forks a child that saves
    checkpoints in a loop until it is killed, and reports on stdout (one line each, written with
    ``os.write`` so nothing sits in a buffer when the child dies)::

        PID <pid>                       the child that the test will SIGKILL
        START <counter> <name>          a save of crash_state(counter) to <run_dir>/<name> begins
        DONE <counter> <name> <secs>    sv.save returned
        REAPED <pid>                    the child is dead: no more writes can happen

    Forking from a warm process makes each restart cost milliseconds instead of a torch import.

``train`` / ``resume``
    The exact-resume workload of tests/test_resume_exact.py: a small MLP with dropout trained by
    AdamW with OneCycleLR and a GradScaler, on data drawn from torch, numpy and python ``random``.
    ``train`` runs steps 1..N uninterrupted and saves a checkpoint after step k; ``resume`` builds
    fresh objects in a new process, loads that checkpoint and runs steps k+1..N. Both write their
    losses and final model, optimizer, scheduler and scaler state to ``--out`` (a JSON file with
    exact float hex and a safetensors file written with the stock library, independent of
    statevault) so that the test can compare them bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch

import statevault as sv

# ---------------------------------------------------------------------------------------------
# Crash-save workload
# ---------------------------------------------------------------------------------------------

OVERWRITTEN = "current"  # the path every even counter is saved onto with overwrite=True
CRASH_SHAPES = {  # ~8 MiB over several tensors, so a save takes a measurable time
    "w0": (512, 1024),
    "w1": (1024, 768),
    "w2": (256, 1024),
    "b0": (1024,),
}
MAX_SAVES_PER_CHILD = 200  # a child left unkilled (a broken test) stops on its own


def crash_target(counter: int) -> tuple[str, bool]:
    """(directory name, overwrite) of the save of ``counter``: even ones overwrite one path."""
    if counter % 2 == 0:
        return OVERWRITTEN, True
    return f"new_{counter:06d}", False


def crash_state(counter: int) -> dict[str, Any]:
    """The state saved for ``counter``: every byte of it is a function of the counter."""
    generator = torch.Generator().manual_seed(counter)
    weights = {
        name: torch.randn(shape, generator=generator) for name, shape in CRASH_SHAPES.items()
    }
    weights["w1"] = weights["w1"].to(torch.bfloat16)
    rows = np.random.default_rng(counter).integers(0, 1 << 40, size=(64, 256), dtype=np.int64)
    return {
        "counter": counter,
        "weights": weights,
        "table": rows,
        "meta": {"name": crash_target(counter)[0], "history": list(range(counter % 7))},
    }


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def _crash_child(run_dir: str, first: int) -> None:
    for counter in range(first, first + MAX_SAVES_PER_CHILD):
        state = crash_state(counter)
        name, overwrite = crash_target(counter)
        _say(f"START {counter} {name}")
        started = time.perf_counter()
        sv.save(state, os.path.join(run_dir, name), overwrite=overwrite)
        _say(f"DONE {counter} {name} {time.perf_counter() - started:.6f}")


def _warm_up() -> None:
    """Import everything a save touches once, before forking, so each child starts fast."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        target = os.path.join(scratch, "warm")
        sv.save(crash_state(0), target)
        sv.save(crash_state(0), target, overwrite=True)


def crash_server() -> None:
    torch.set_num_threads(1)  # no OpenMP pool in the parent of forks
    _warm_up()
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            return
        run_dir, first = words[1], int(words[2])
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _say(f"PID {os.getpid()}")  # from the child, so that it precedes its START
                _crash_child(run_dir, first)
            except BaseException as exc:
                _say(f"ERROR {type(exc).__name__}: {exc}")
                code = 1
            os._exit(code)
        os.waitpid(pid, 0)
        _say(f"REAPED {pid}")


# ---------------------------------------------------------------------------------------------
# Exact-resume training workload
# ---------------------------------------------------------------------------------------------

SEED = 1234
IN_FEATURES, HIDDEN = 16, 64
BATCH = 32


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(IN_FEATURES, HIDDEN)
        self.drop = torch.nn.Dropout(0.3)
        self.fc2 = torch.nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.drop(torch.relu(self.fc1(x))))
        return out


def build(total_steps: int) -> dict[str, Any]:
    """Fresh, seeded training objects (the same in every process)."""
    torch.set_num_threads(1)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=total_steps)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}


def _target_weights() -> torch.Tensor:
    weights: torch.Tensor = torch.linspace(-1.0, 1.0, IN_FEATURES).unsqueeze(1)
    return weights


def train_step(objs: dict[str, Any]) -> float:
    """One step; draws from torch (data, dropout), numpy (noise) and python random (augment)."""
    model, optimizer = objs["model"], objs["optimizer"]
    model.train()
    x = torch.randn(BATCH, IN_FEATURES)
    if random.random() < 0.5:
        x = x.flip(1)
    x = x * random.uniform(0.5, 1.5)
    noise = torch.from_numpy(np.random.normal(0.0, 0.1, size=(BATCH, 1)).astype(np.float32))
    y = x @ _target_weights() + noise
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    objs["scaler"].scale(loss).backward()
    objs["scaler"].step(optimizer)
    objs["scaler"].update()
    objs["scheduler"].step()
    return float(loss.item())


def checkpoint_state(objs: dict[str, Any], step: int) -> dict[str, Any]:
    return {**objs, "rng": sv.RNGState(), "step": step}


def write_results(objs: dict[str, Any], losses: dict[int, float], out: str) -> None:
    """Losses (float hex) and final state to ``out``.json / ``out``.safetensors."""
    import safetensors.torch

    tensors = {f"model/{k}": v.contiguous() for k, v in objs["model"].state_dict().items()}
    optimizer_state = objs["optimizer"].state_dict()
    for pid, slots in optimizer_state["state"].items():
        for key, value in slots.items():
            tensors[f"optimizer/{pid}/{key}"] = value.contiguous()
    safetensors.torch.save_file(tensors, f"{out}.safetensors")
    summary = {
        "losses": {str(step): loss.hex() for step, loss in losses.items()},
        "param_groups": optimizer_state["param_groups"],
        "scheduler": objs["scheduler"].state_dict(),
        "scaler": objs["scaler"].state_dict(),
    }
    with open(f"{out}.json", "w") as handle:
        json.dump(summary, handle, sort_keys=True)


def run_train(steps: int, save_at: int, ckpt: str, out: str) -> None:
    objs = build(steps)
    losses: dict[int, float] = {}
    for step in range(1, steps + 1):
        losses[step] = train_step(objs)
        if step == save_at:
            sv.save(checkpoint_state(objs, step), ckpt)
    write_results(objs, losses, out)


def run_resume(steps: int, ckpt: str, out: str, *, restore_rng: bool) -> None:
    objs = build(steps)  # fresh objects, seeded as at the start of the run
    if restore_rng:
        loaded = sv.load(ckpt, into={**objs, "rng": sv.RNGState(), "step": None})
    else:  # negative control: everything but the random streams
        loaded = sv.load(ckpt, into={**objs, "step": None}, strict=False)
    first = loaded["step"] + 1
    losses = {step: train_step(objs) for step in range(first, steps + 1)}
    write_results(objs, losses, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["crash-server", "train", "resume"])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--save-at", type=int, default=10)
    parser.add_argument("--ckpt")
    parser.add_argument("--out")
    parser.add_argument("--no-rng", action="store_true", help="resume without the RNG state")
    args = parser.parse_args(argv)
    if args.mode == "crash-server":
        crash_server()
    elif args.mode == "train":
        run_train(args.steps, args.save_at, args.ckpt, args.out)
    else:
        run_resume(args.steps, args.ckpt, args.out, restore_rng=not args.no_rng)


if __name__ == "__main__":
    main()
