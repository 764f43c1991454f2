"""statevault.accelerate: ``accelerator.save_state`` / ``load_state`` through statevault, on 2
CPU processes (gloo, launched by ``torch.distributed.run``).

One launch, every process running the same script (``python -m tests.test_accelerate``):

1. a seeded run (dropout, AdamW, a warmup schedule, a shuffled, seedable sampler), its
   ``save_state()`` calls with automatic checkpoint naming and ``total_limit=2``, one of them
   asynchronous; trained on for a second epoch: the reference parameters;
2. fresh objects (other initial weights), ``load_state()`` of the newest checkpoint (the end
   of epoch 1), the second epoch trained again: bit-identical to the reference on every rank;
3. an explicit ``save_state(dir)`` with a save hook that drops the model, then ``load_state``
   with the matching load hook.

The parent checks what is on disk: only the newest two checkpoints, each a statevault
checkpoint saved by 2 ranks that verifies and loads into a plain model in one process, and no
pickle anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import statevault as sv
from tests.test_lightning import ROOT, assert_no_pickle

STEPS_PER_EPOCH = 8  # 64 samples, batches of 4 on each of 2 ranks


def test_save_and_load_state_on_two_processes(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--standalone",  # the launcher binds its own store on a port it keeps: no port to race for
        "-m",
        "tests.test_accelerate",
        str(tmp_path),
    ]
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["resumed_from"].endswith("checkpoint_2"), seen
        assert seen["bit_identical"], seen
        assert seen["hooks_ran"] == ["save", "load"]
    checkpoints = tmp_path / "project" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_1", "checkpoint_2"]
    for path in checkpoints.iterdir():
        assert sv.verify(path).ok
        info = json.loads((path / "manifest.json").read_text())["body"]["info"]
        assert info["world_size"] == 2
    import torch

    plain = _model(torch)  # one process, no wrapper: the unwrapped state dict loads as it is
    sv.load(checkpoints / "checkpoint_2", only="models/0", into=plain)
    assert assert_no_pickle(tmp_path / "project") > 0


# ---- the processes -----------------------------------------------------------------------------


def _model(torch: Any) -> Any:
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )


def _prepared(accelerator: Any, seed: int) -> tuple[Any, Any, Any, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    model = _model(torch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(64, 8, generator=generator), torch.randn(64, 4, generator=generator)
    )
    loader = DataLoader(data, batch_size=4, shuffle=True)
    prepared: tuple[Any, Any, Any, Any] = accelerator.prepare(model, optimizer, loader, schedule)
    return prepared


def _epoch(accelerator: Any, model: Any, optimizer: Any, loader: Any, schedule: Any) -> None:
    model.train()
    for x, y in loader:
        with accelerator.accumulate(model):  # counts accelerator.step
            loss = (model(x) - y).pow(2).mean()
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()


def _params(model: Any) -> list[bytes]:
    return [p.detach().numpy().tobytes() for p in model.parameters()]


def main(base: Path) -> None:
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, set_seed

    import statevault.accelerate as sva

    config = ProjectConfiguration(
        str(base / "project"), automatic_checkpoint_naming=True, total_limit=2
    )
    accelerator = Accelerator(
        cpu=True,
        project_config=config,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(0)
    model, optimizer, loader, schedule = _prepared(accelerator, seed=1)
    checkpoints = sva.install(accelerator)
    accelerator.save_state()  # checkpoint_0: before training
    _epoch(accelerator, model, optimizer, loader, schedule)
    accelerator.save_state()  # checkpoint_1
    checkpoints.wait()
    async_checkpoints = sva.install(accelerator, async_save=True)
    accelerator.save_state()  # checkpoint_2 (async): the end of epoch 1; checkpoint_0 deleted
    step = accelerator.step
    _epoch(accelerator, model, optimizer, loader, schedule)
    async_checkpoints.wait()
    reference = _params(accelerator.unwrap_model(model))

    accelerator.free_memory()  # forget the prepared objects (and accelerator.step)
    model, optimizer, loader, schedule = _prepared(accelerator, seed=2)  # other weights
    sva.install(accelerator)
    resumed_from = accelerator.load_state()
    restored_step = accelerator.step
    _epoch(accelerator, model, optimizer, loader, schedule)
    identical = _params(accelerator.unwrap_model(model)) == reference

    hooks: list[str] = []
    saved_weights = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}

    def drop_weights(models: list[Any], weights: list[Any], output_dir: str) -> None:
        hooks.append("save")
        weights.pop()

    def drop_model(models: list[Any], input_dir: str) -> None:
        hooks.append("load")
        models.pop()

    accelerator.project_configuration.automatic_checkpoint_naming = False  # output_dir counts
    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(drop_model)
    accelerator.save_state(str(base / "explicit"))
    with torch.no_grad():
        for parameter in accelerator.unwrap_model(model).parameters():
            parameter.add_(1.0)  # not restored: the hooks took the model out
    accelerator.load_state(str(base / "explicit"))
    moved = accelerator.unwrap_model(model).state_dict()
    hooks_ok = all(not torch.equal(moved[k], v) for k, v in saved_weights.items())
    seen = {
        "resumed_from": resumed_from,
        "bit_identical": identical and restored_step == step,
        "hooks_ran": hooks if hooks_ok else [],
        "step": step,
    }
    rank = accelerator.process_index
    (base / f"rank{rank}.json").write_text(json.dumps(seen))
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
