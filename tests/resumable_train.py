"""A training run whose data position is ``sv.resumable``'s: the program tests/test_resumable_kill
SIGKILLs and restarts.

3 epochs of a shuffled DataLoader with 2 worker processes over a dataset with random
augmentation (noise drawn from torch's generator inside the workers), a model with dropout,
AdamW; ``CheckpointManager`` saves {model, optimizer, data, rng} every 2 steps (5 batches per
epoch: the saves at steps 4 and 14 fall on the last batch of an epoch). Each step appends one
line to the log: the step, the batch's keys, a hash of its values and the loss (float.hex); at
the end the parameters go to ``--out``. Usage::

    python tests/resumable_train.py --run DIR --log FILE --out FILE [--pause SECONDS]
    python tests/resumable_train.py --serve

``--serve`` imports everything once, then forks one run per line of standard input (a JSON
list of arguments): it prints the run's pid, waits for it and prints its exit status. A test
restarts the program in milliseconds that way instead of seconds of imports.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
import traceback
from typing import Any

import safetensors.torch
import torch
from torch.utils.data import DataLoader, Dataset

import statevault as sv

EPOCHS, SIZE, BATCH, SAVE_EVERY = 3, 20, 4, 2


class Points(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    def __len__(self) -> int:
        return SIZE

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        clean = torch.linspace(-1.0, 1.0, 4) * (key + 1) / SIZE
        return clean + 0.1 * torch.randn(4), torch.tensor([float(key % 3)]), key


def log_step(fd: int, step: int, keys: Any, inputs: torch.Tensor, loss: float) -> None:
    digest = hashlib.sha256(inputs.numpy().tobytes()).hexdigest()[:16]
    line = f"{step} {','.join(str(int(k)) for k in keys)} {digest} {loss.hex()}\n"
    os.write(fd, line.encode())  # one write to an O_APPEND file: a kill never leaves half a line


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--pause", type=float, default=0.0)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = sv.resumable(DataLoader(Points(), batch_size=BATCH, shuffle=True, num_workers=2))
    state = {"model": model, "optimizer": optimizer, "data": data, "rng": sv.RNGState()}
    log = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with sv.CheckpointManager(args.run, max_to_keep=2, save_interval_steps=SAVE_EVERY) as mgr:
        restored = mgr.restore(into=state)
        step = restored.step + 1 if restored else 0
        while data.epoch < EPOCHS:
            for inputs, targets, keys in data:
                loss = (model(inputs) - targets).square().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                log_step(log, step, keys, inputs, loss.item())
                if mgr.should_save(step):
                    mgr.save(step, state)
                step += 1
                time.sleep(args.pause)  # gives a killer time to land between steps
    os.close(log)
    safetensors.torch.save_file(dict(model.state_dict()), args.out)


def serve() -> None:
    """Fork a run per line of standard input (see the module docstring)."""
    warm = torch.nn.Linear(1, 1)
    torch.optim.AdamW(warm.parameters()).step()  # imports what the first step imports
    assert threading.active_count() == 1, threading.enumerate()  # fork is safe
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                main(json.loads(line))
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        main(sys.argv[1:])
