"""Each trainer framework's own checkpoint save against statevault's, on the same model.

    python benchmarks/integrations_bench.py              # GPT-2, 4 layers x 512 (~17M params)
    python benchmarks/integrations_bench.py --quick      # 2 layers x 128, 1 rep (a smoke run)

One model for every framework: a GPT-2 causal LM built from a config (no download), trained one
step with AdamW, so that a checkpoint holds the weights (~67 MB), the two AdamW moments, the
LR schedule and the framework's own bookkeeping (~200 MB in all). Rows, per framework:

- Lightning: ``trainer.save_checkpoint`` through ``TorchCheckpointIO`` (its default),
  ``AsyncCheckpointIO(TorchCheckpointIO())``, ``statevault.lightning.CheckpointIO()`` and
  ``CheckpointIO(async_save=True)``;
- Hugging Face Trainer: ``_save_checkpoint`` (what ``save_steps`` calls) of
  ``transformers.Trainer`` (it has no async save) and of ``statevault.hf.Trainer``, sync and
  with ``checkpoint_options={"async_save": True}``;
- Accelerate: ``accelerator.save_state`` (Accelerate's own, no async save) and
  ``statevault.accelerate``'s, sync and async.

**stall**: how long the call blocks training. **durable**: from the call until the checkpoint
is on disk: for statevault, until its commit (fsynced); for the frameworks' own writers, which
do not fsync, the call (and for Lightning's async IO, its thread) plus an fsync of every file
they wrote. Each figure is the median of ``--reps`` saves into fresh paths; the ratios divide
by the framework's own synchronous writer (below 1: statevault blocks or takes less).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import statevault  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
import torch  # noqa: E402

Timing = tuple[float, float, int]  # (stall, durable) seconds of one save, bytes written


def fsync_tree(path: str) -> None:
    """Make what a framework wrote durable, as statevault's commit is: every file, then the
    directories."""
    paths = [path] if os.path.isfile(path) else []
    for root, _, files in os.walk(path):
        paths += [os.path.join(root, name) for name in files]
    for name in paths:
        with open(name, "rb") as handle:
            os.fsync(handle.fileno())
    for directory in {os.path.dirname(path), *(os.path.dirname(p) for p in paths)}:
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def size_of(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(path) for n in names)


def gpt2(quick: bool) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width = (2, 128) if quick else (4, 512)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=8, vocab_size=8192, n_positions=64)
    return GPT2LMHeadModel(config)


def tokens(rows: int) -> Any:
    ids = torch.randint(0, 8192, (rows, 32), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def median_of(timings: list[Timing]) -> Timing:
    return (
        statistics.median(t[0] for t in timings),
        statistics.median(t[1] for t in timings),
        max(t[2] for t in timings),
    )


# ---- Lightning ---------------------------------------------------------------------------------


def lightning_rows(base: str, reps: int, quick: bool) -> dict[str, Timing]:
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    import statevault.lightning as svl

    writers: dict[str, Callable[[], Any]] = {
        "TorchCheckpointIO (Lightning's default)": TorchCheckpointIO,
        "AsyncCheckpointIO(TorchCheckpointIO)": lambda: AsyncCheckpointIO(TorchCheckpointIO()),
        "statevault CheckpointIO": svl.CheckpointIO,
        "statevault CheckpointIO(async_save=True)": lambda: svl.CheckpointIO(async_save=True),
    }
    return {
        name: lightning_row(make(), os.path.join(base, f"lightning-{i}"), reps, quick)
        for i, (name, make) in enumerate(writers.items())
    }


def lightning_row(io_plugin: Any, folder: str, reps: int, quick: bool) -> Timing:
    import lightning.pytorch as pl

    class LM(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = gpt2(quick)

        def training_step(self, batch: Any, index: int) -> Any:
            return self.model(**batch).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    trainer = pl.Trainer(
        max_steps=1,
        plugins=[io_plugin],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LM(), torch.utils.data.DataLoader(tokens(4), batch_size=2))
    timings = []
    for rep in range(reps):
        path = os.path.join(folder, f"rep{rep}.ckpt")
        started = time.perf_counter()
        trainer.save_checkpoint(path)
        stall = time.perf_counter() - started
        wait = getattr(io_plugin, "wait", None)
        if wait is not None:
            wait()  # statevault: durable once committed
        else:
            io_plugin.teardown()  # Lightning's async IO: its thread done
            fsync_tree(path)
        timings.append((stall, time.perf_counter() - started, size_of(path)))
    shutil.rmtree(folder, ignore_errors=True)
    return median_of(timings)


# ---- Hugging Face Trainer ----------------------------------------------------------------------


def hf_rows(base: str, reps: int, quick: bool) -> dict[str, Timing]:
    import transformers

    import statevault.hf as svhf

    variants: dict[str, tuple[type[Any], dict[str, Any]]] = {
        "transformers.Trainer (own)": (transformers.Trainer, {}),
        "statevault.hf.Trainer": (svhf.Trainer, {"checkpoint_options": {"max_to_keep": None}}),
        "statevault.hf.Trainer async": (
            svhf.Trainer,
            {"checkpoint_options": {"max_to_keep": None, "async_save": True}},
        ),
    }
    return {
        name: hf_row(kind, options, os.path.join(base, f"hf-{i}"), reps, quick)
        for i, (name, (kind, options)) in enumerate(variants.items())
    }


def hf_row(kind: type[Any], options: dict[str, Any], folder: str, reps: int, quick: bool) -> Timing:
    import transformers

    timings: list[Timing] = []

    class Timed(kind):  # type: ignore[misc, valid-type]
        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            started = time.perf_counter()
            super()._save_checkpoint(model, trial)
            stall = time.perf_counter() - started
            checkpoints = getattr(self, "checkpoints", None)
            if checkpoints is not None:
                checkpoints.wait()
                path = checkpoints.path(self.state.global_step)
            else:
                path = os.path.join(folder, f"checkpoint-{self.state.global_step}")
                fsync_tree(path)
            timings.append((stall, time.perf_counter() - started, size_of(path)))

    args = transformers.TrainingArguments(
        folder,
        max_steps=reps,
        save_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Timed(model=gpt2(quick), args=args, train_dataset=tokens(8), **options)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train()
    shutil.rmtree(folder, ignore_errors=True)
    return median_of(timings)


# ---- Accelerate --------------------------------------------------------------------------------


def accelerate_rows(base: str, reps: int, quick: bool) -> dict[str, Timing]:
    names = ("accelerator.save_state (own)", "statevault", "statevault async")
    return {
        name: accelerate_row(i, os.path.join(base, f"accelerate-{i}"), reps, quick)
        for i, name in enumerate(names)
    }


def accelerate_row(variant: int, folder: str, reps: int, quick: bool) -> Timing:
    """Variant 0: Accelerate's own save_state; 1: statevault's; 2: statevault's, async."""
    from accelerate import Accelerator

    import statevault.accelerate as sva

    accelerator = Accelerator(cpu=True)
    model = gpt2(quick)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = tokens(2)[0]
    model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
    optimizer.step()
    checkpoints = sva.install(accelerator, async_save=variant == 2) if variant else None
    timings = []
    for rep in range(reps):
        path = os.path.join(folder, f"rep{rep}")
        started = time.perf_counter()
        accelerator.save_state(path)
        stall = time.perf_counter() - started
        if checkpoints is not None:
            checkpoints.wait()
        else:
            fsync_tree(path)
        timings.append((stall, time.perf_counter() - started, size_of(path)))
    if checkpoints is not None:
        checkpoints.close()
    accelerator.free_memory()
    shutil.rmtree(folder, ignore_errors=True)
    return median_of(timings)


# ---- the table ---------------------------------------------------------------------------------


def print_table(results: dict[str, dict[str, Timing]]) -> None:
    head = f"{'framework':<11} {'writer':<41} {'MB':>5} {'stall s':>8} {'durable s':>9}"
    print(f"{head} {'stall':>7} {'durable':>7}")
    for framework, rows in results.items():
        own_stall, own_durable, _ = next(iter(rows.values()))
        for name, (stall, durable, size) in rows.items():
            print(
                f"{framework:<11} {name:<41} {size / 1e6:5.0f} {stall:8.3f} {durable:9.3f} "
                f"{stall / own_stall:6.2f}x {durable / own_durable:6.2f}x"
            )
    print("(stall, durable: median seconds; the ratios divide by the first row of the framework)")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(logging.NOTSET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a small model, 1 rep")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    base = tempfile.mkdtemp(prefix="sv-integrations-", dir=args.dir)
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"torch {torch.__version__}, writing to {base}"
    )
    try:
        with quiet():
            results = {
                "Lightning": lightning_rows(base, reps, args.quick),
                "HF Trainer": hf_rows(base, reps, args.quick),
                "Accelerate": accelerate_rows(base, reps, args.quick),
            }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print_table(results)


if __name__ == "__main__":
    main()
