"""statevault.lightning.CheckpointIO inside real Lightning training runs.

Every Lightning run happens in one child process that imports Lightning once and forks a fresh
process per job (``python -m tests.test_lightning JOBS``): a job SIGKILLed mid-run is a real
kill of a real process, and each resume is a new process, while Lightning's import (~6 s) is
paid once. The jobs:

- the same seeded run under Lightning's default IO and under statevault's (sync, then async),
  each SIGKILLed mid-run and resumed with ``fit(ckpt_path="last")``: final parameters
  bit-identical; the async run is killed *inside* the save of ``last.ckpt`` (just before its
  commit) and ``last.ckpt`` must still load, holding the step before;
- ModelCheckpoint unchanged: ``save_top_k`` by a monitored metric, ``save_last``,
  ``every_n_train_steps``, ``validate(ckpt_path="best")``, ``remove_checkpoint`` honoured;
- the whole dict Lightning builds (and an AMP scaler's, hyper-parameters, int keys, tuples)
  round-trips with exact types; no file written is a pickle;
- async saves need no lock: the state changed right after ``save_checkpoint`` is not what
  is written.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import statevault as sv

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 12  # 96 samples, batches of 8
KILL_STEP = 13  # in the second epoch, after the save of step 10


# ---- the parent side ---------------------------------------------------------------------------


def run_jobs(module: str, jobs: list[dict[str, Any]], timeout: float = 300) -> list[int]:
    """Run ``jobs`` in one child that forks a process per job; each job's exit status
    (negative: killed by that signal)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", module, json.dumps(jobs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-6000:]
    statuses: list[int] = json.loads(lines[-1])
    failed = [
        job["name"] for job, status in zip(jobs, statuses, strict=True) if status not in (0, -9)
    ]
    assert not failed, f"jobs {failed} failed:\n{result.stderr[-8000:]}"
    return statuses


def serve(jobs: list[dict[str, Any]], registry: dict[str, Callable[..., None]]) -> None:
    """The child: run each job in a process forked from this one; print their statuses."""
    statuses = []
    for job in jobs:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                registry[job["name"]](**job.get("args", {}))
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        statuses.append(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    print(json.dumps(statuses))


def assert_no_pickle(root: Path) -> int:
    """No file under ``root`` is a pickle or a torch.save archive; returns the files seen."""
    files = [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        data = path.read_bytes()
        assert not data.startswith((b"\x80", b"PK\x03\x04")), f"{path} is a pickle or a zip"
        assert path.suffix not in (".pt", ".pth", ".bin", ".pkl"), path
        try:
            pickletools.dis(io.BytesIO(data), out=io.StringIO())
        except Exception:
            continue
        raise AssertionError(f"{path} parses as a pickle")
    return len(files)


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("lightning")

    def train(io_kind: str, run: str, kill: str | None, out: str | None = None) -> dict[str, Any]:
        args = {"io_kind": io_kind, "run": str(base / run), "kill": kill, "out": out}
        return {"name": "train", "args": args}

    jobs = [
        train("torch", "torch", f"step:{KILL_STEP}"),
        train("torch", "torch", None, str(base / "torch.st")),
        train("sv", "sv", f"step:{KILL_STEP}"),
        train("sv", "sv", None, str(base / "sv.st")),
        train("sv-async", "async", "publish:3"),  # the third save of last.ckpt: step 15
        {"name": "inspect_after_kill", "args": {"run": str(base / "async")}},
        train("sv-async", "async", None, str(base / "async.st")),
        {"name": "model_checkpoint", "args": {"run": str(base / "topk")}},
        {"name": "whole_dict", "args": {"run": str(base / "dict")}},
        {"name": "async_needs_no_lock", "args": {"run": str(base / "nolock")}},
    ]
    statuses = run_jobs("tests.test_lightning", jobs)
    return {"base": base, "statuses": statuses}


# ---- the tests ---------------------------------------------------------------------------------


def test_kill_and_resume_is_bit_identical_to_lightnings_own_io(
    lightning_runs: dict[str, Any],
) -> None:
    from safetensors.numpy import load_file

    base, statuses = lightning_runs["base"], lightning_runs["statuses"]
    assert statuses[0] == statuses[2] == statuses[4] == -signal.SIGKILL  # killed mid-run
    reference = load_file(str(base / "torch.st"))
    for name in ("sv.st", "async.st"):
        resumed = load_file(str(base / name))
        assert resumed.keys() == reference.keys()
        for key, value in reference.items():
            assert resumed[key].tobytes() == value.tobytes(), (name, key)


def test_a_kill_inside_the_save_of_last_leaves_last_loadable(
    lightning_runs: dict[str, Any],
) -> None:
    base = lightning_runs["base"]
    seen = json.loads((base / "async" / "after_kill.json").read_text())
    assert seen["leftovers"], "the kill did not land inside the save of last.ckpt"
    assert seen["last_ok"] and seen["last_step"] == 10  # the step before the killed save
    # the resumed run swept the dead save's temporary and went on to the end
    assert not [p for p in (base / "async").iterdir() if ".tmp-" in p.name]
    assert sv.load(base / "async" / "last.ckpt")["global_step"] == 20  # saved every 5 steps


def test_model_checkpoint_top_k_last_best_and_removal(lightning_runs: dict[str, Any]) -> None:
    seen = json.loads((lightning_runs["base"] / "topk" / "seen.json").read_text())
    assert seen["listing"] == sorted([*seen["best_k"], "last.ckpt"])
    assert seen["removed_gone"] and seen["best_validated"]
    assert seen["foreign_kept"]


def test_whole_checkpoint_dict_round_trips_without_pickle(lightning_runs: dict[str, Any]) -> None:
    base = lightning_runs["base"]
    assert json.loads((base / "dict" / "seen.json").read_text()) == {"equal": True}
    for run in ("sv", "async", "topk", "dict", "nolock"):
        assert assert_no_pickle(base / run) > 0


def test_async_save_needs_no_lock(lightning_runs: dict[str, Any]) -> None:
    seen = json.loads((lightning_runs["base"] / "nolock" / "seen.json").read_text())
    assert seen == {"saved_is_snapshot": True, "second_save_did_not_wait": True}


# ---- the child side: jobs (run with Lightning imported) ----------------------------------------


def _module_class() -> Any:
    import lightning.pytorch as pl
    import torch

    class Regressor(pl.LightningModule):  # type: ignore[misc]
        def __init__(self, hidden: int = 16, lr: float = 0.01) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, hidden), torch.nn.Dropout(0.1), torch.nn.Linear(hidden, 1)
            )

        def training_step(self, batch: Any, index: int) -> Any:
            x, y = batch
            loss = (self.net(x) - y).pow(2).mean()
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, index: int) -> None:
            x, y = batch
            self.log("val_loss", (self.net(x) - y).pow(2).mean())

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            schedule = torch.optim.lr_scheduler.StepLR(opt, 4)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    return Regressor


def _data(shuffle: bool = True) -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 4, generator=generator), torch.randn(96, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=shuffle)


def _io(io_kind: str) -> Any:
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    import statevault.lightning as svl

    if io_kind == "torch":
        return TorchCheckpointIO()
    return svl.CheckpointIO(async_save=io_kind == "sv-async")


def _kill_inside_last_save(nth: int) -> None:
    """SIGKILL this process inside the ``nth`` save of last.ckpt, its shards written, just
    before its commit (the rename)."""
    from statevault.checkpoint import commit

    original, count = commit.publish, [0]

    def publish(tmp: str, path: str, overwrite: bool) -> None:
        if os.path.basename(path) == "last.ckpt":
            count[0] += 1
            if count[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        original(tmp, path, overwrite)

    commit.publish = publish


def job_train(io_kind: str, run: str, kill: str | None, out: str | None) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from safetensors.torch import save_file

    class KillAt(Callback):  # type: ignore[misc]
        def __init__(self, step: int) -> None:
            self.step = step

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == self.step:
                wait = getattr(trainer.strategy.checkpoint_io, "wait", None)
                if wait is not None:
                    wait()  # the same kill point for every IO: the save of step 10 durable
                os.kill(os.getpid(), signal.SIGKILL)

    pl.seed_everything(0)
    checkpoints = ModelCheckpoint(
        dirpath=run, every_n_train_steps=5, save_last=True, save_top_k=2, monitor="step", mode="max"
    )
    callbacks: list[Any] = [checkpoints]
    if kill is not None and kill.startswith("step:"):
        callbacks.append(KillAt(int(kill.split(":")[1])))
    elif kill is not None:
        _kill_inside_last_save(int(kill.split(":")[1]))
    model = _module_class()()
    trainer = pl.Trainer(
        max_epochs=2,
        plugins=[_io(io_kind)],
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, _data(), ckpt_path="last")
    if out is not None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)


def job_inspect_after_kill(run: str) -> None:
    last = Path(run) / "last.ckpt"
    seen = {
        "leftovers": [p.name for p in Path(run).iterdir() if ".tmp-" in p.name],
        "last_ok": sv.verify(last).ok,
        "last_step": sv.load(last)["global_step"],
    }
    (Path(run) / "after_kill.json").write_text(json.dumps(seen))


def job_model_checkpoint(run: str) -> None:
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    import statevault.lightning as svl

    pl.seed_everything(0)
    checkpoints = ModelCheckpoint(
        dirpath=run, every_n_train_steps=3, save_top_k=2, monitor="train_loss", save_last=True
    )
    trainer = pl.Trainer(
        max_epochs=2,
        plugins=[svl.CheckpointIO(async_save=True)],
        callbacks=[checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    removed: list[str] = []
    io_plugin = trainer.strategy.checkpoint_io
    remove = io_plugin.remove_checkpoint
    io_plugin.remove_checkpoint = lambda path: (removed.append(str(path)), remove(path))[1]
    trainer.fit(_module_class()(), _data())
    best_k = sorted(Path(p).name for p in checkpoints.best_k_models)
    result = trainer.validate(ckpt_path="best", dataloaders=_data(shuffle=False), verbose=False)
    foreign = Path(run) / "notes.ckpt"
    foreign.write_text("not a checkpoint")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        remove(foreign)
    seen = {
        "listing": sorted(p.name for p in Path(run).iterdir() if p.name != "notes.ckpt"),
        "best_k": best_k,
        "removed_gone": bool(removed) and not any(os.path.exists(p) for p in removed),
        "best_validated": bool(result) and "val_loss" in result[0],
        "foreign_kept": foreign.exists(),
    }
    (Path(run) / "seen.json").write_text(json.dumps(seen))


def job_whole_dict(run: str) -> None:
    from collections import OrderedDict

    import torch
    from lightning.fabric.utilities.data import AttributeDict

    import statevault.lightning as svl
    from statevault.integrations.lightning import plain_tree

    model = _module_class()()
    optimizer = torch.optim.AdamW(model.parameters())
    model.net(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    checkpoint = {
        "epoch": 1,
        "global_step": 24,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": model.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 2}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": None}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [{"last_epoch": 3, "_last_lr": [0.001]}],
        "MixedPrecision": scaler.state_dict(),
        "hparams_name": "kwargs",
        "hyper_parameters": AttributeDict(hidden=16, lr=0.01, dims=(4, 1), tags=["a"]),
        "shapes": torch.Size([2, 3]),
        "ints": {0: 1, 7: (2, 3)},
    }
    io_plugin = svl.CheckpointIO()
    io_plugin.save_checkpoint(checkpoint, os.path.join(run, "whole.ckpt"))
    loaded = io_plugin.load_checkpoint(os.path.join(run, "whole.ckpt"))
    expected = plain_tree(checkpoint)
    expected["shapes"] = (2, 3)
    equal = _same(loaded, expected) and type(loaded["state_dict"]) is OrderedDict
    (Path(run) / "seen.json").write_text(json.dumps({"equal": equal}))


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def job_async_needs_no_lock(run: str) -> None:
    import threading

    import torch

    import statevault.lightning as svl
    from statevault.checkpoint import commit

    release, original = threading.Event(), commit.publish

    def publish(tmp: str, path: str, overwrite: bool) -> None:
        if path.endswith("a.ckpt"):
            release.wait(30)  # hold the first save in flight until the second one returned
        original(tmp, path, overwrite)

    commit.publish = publish
    io_plugin = svl.CheckpointIO(async_save=True)
    weights = torch.arange(1 << 20, dtype=torch.float32)
    io_plugin.save_checkpoint({"state_dict": {"w": weights}, "step": 1}, f"{run}/a.ckpt")
    weights.add_(1.0)  # training goes on at once, with no lock
    io_plugin.save_checkpoint({"state_dict": {"w": weights}, "step": 2}, f"{run}/b.ckpt")
    second_returned_first = not release.is_set()
    release.set()
    io_plugin.teardown()
    first = io_plugin.load_checkpoint(f"{run}/a.ckpt")["state_dict"]["w"]
    second = io_plugin.load_checkpoint(f"{run}/b.ckpt")["state_dict"]["w"]
    seen = {
        "saved_is_snapshot": bool(
            torch.equal(first, weights - 1.0) and torch.equal(second, weights)
        ),
        "second_save_did_not_wait": second_returned_first,
    }
    (Path(run) / "seen.json").write_text(json.dumps(seen))


JOBS: dict[str, Callable[..., None]] = {
    "train": job_train,
    "inspect_after_kill": job_inspect_after_kill,
    "model_checkpoint": job_model_checkpoint,
    "whole_dict": job_whole_dict,
    "async_needs_no_lock": job_async_needs_no_lock,
}

if __name__ == "__main__":
    import lightning.pytorch  # noqa: F401  (imported once, before the forks)

    import statevault.lightning

    serve(json.loads(sys.argv[1]), JOBS)
