"""statevault.hf.Trainer: the Hugging Face Trainer checkpointing through statevault, on a tiny
causal LM built from a config (GPT-2, 2 layers, 64 wide; no hub download) and an in-memory
dataset. As in test_lightning, the runs are jobs forked from one child that imported
transformers once (``python -m tests.test_hf_trainer JOBS``):

- an uninterrupted run, and the same run SIGKILLed mid-run (async saves) then resumed by a plain
  ``train()``: final parameters bit-identical (model, AdamW, the LR schedule, dropout's random
  streams, ``TrainerState``, and the data position through HF's own batch skipping);
- ``save_total_limit`` honoured, the best checkpoint by ``metric_for_best_model`` kept and
  loaded at the end (``load_best_model_at_end``);
- the newest checkpoint truncated: ``train(resume_from_checkpoint=True)`` skips it with a
  warning and resumes from the one before;
- SIGTERM: the trainer saves after the current step and stops;
- no file written is a pickle (HF writes optimizer.pt, scheduler.pt, rng_state.pth).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.test_lightning import assert_no_pickle, run_jobs, serve

KILL_STEP = 10  # after the save of step 8 (save_steps=4), mid-epoch (6 steps per epoch)
MAX_STEPS = 18


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("hf")

    def train(run: str, **args: Any) -> dict[str, Any]:
        return {"name": "train", "args": {"run": str(base / run), **args}}

    jobs = [
        train("full", out=str(base / "full.st")),
        train("killed", kill=KILL_STEP, async_save=True),
        {"name": "listing", "args": {"run": str(base / "killed"), "name": "after_kill"}},
        train("killed", out=str(base / "killed.st")),
        train("best", best=True),
        {"name": "truncated", "args": {"run": str(base / "truncated")}},
        train("preempted", sigterm=6),
    ]
    return {"base": base, "statuses": run_jobs("tests.test_hf_trainer", jobs)}


def test_killed_and_resumed_run_is_bit_identical(hf_runs: dict[str, Any]) -> None:
    from safetensors.numpy import load_file

    base = hf_runs["base"]
    assert hf_runs["statuses"][1] == -signal.SIGKILL
    seen = json.loads((base / "killed" / "after_kill.json").read_text())
    assert seen["steps"] == [4, 8]  # save_total_limit=2
    reference, resumed = load_file(str(base / "full.st")), load_file(str(base / "killed.st"))
    assert reference.keys() == resumed.keys()
    for key, value in reference.items():
        assert resumed[key].tobytes() == value.tobytes(), key
    result = json.loads((base / "killed" / "result.json").read_text())
    assert result["resumed_from"].endswith("step_000000008")
    assert result["global_step"] == MAX_STEPS
    full = json.loads((base / "full" / "result.json").read_text())
    assert result["losses"] == full["losses"][-len(result["losses"]) :]


def test_save_total_limit_and_best_checkpoint(hf_runs: dict[str, Any]) -> None:
    base = hf_runs["base"]
    assert json.loads((base / "full" / "result.json").read_text())["steps"] == [16, 18]
    best = json.loads((base / "best" / "result.json").read_text())
    assert best["steps"] == [best["best_step"], MAX_STEPS]  # save_total_limit=1, plus the best
    assert best["best_step"] < MAX_STEPS and best["best_loaded"]  # loaded at the end


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(hf_runs: dict[str, Any]) -> None:
    seen = json.loads((hf_runs["base"] / "truncated" / "result.json").read_text())
    assert any("step_000000008" in text for text in seen["warnings"]), seen["warnings"]
    assert seen["resumed_from"].endswith("step_000000004")
    assert seen["global_step"] == 12


def test_sigterm_saves_and_stops(hf_runs: dict[str, Any]) -> None:
    seen = json.loads((hf_runs["base"] / "preempted" / "result.json").read_text())
    assert seen["preempted"] and seen["global_step"] == 6 and 6 in seen["steps"]


def test_no_pickle_is_written(hf_runs: dict[str, Any]) -> None:
    base = hf_runs["base"]
    for run in ("full", "killed", "best", "truncated", "preempted"):
        assert assert_no_pickle(base / run) > 0


# ---- the child side ----------------------------------------------------------------------------


def _steps(run: str) -> list[int]:
    names = [p.name for p in Path(run).iterdir()]
    return sorted(int(name[5:]) for name in names if re.fullmatch(r"step_\d+", name))


def _trainer(run: str, max_steps: int = MAX_STEPS, **options: Any) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from statevault.hf import Trainer

    class Tokens(torch.utils.data.Dataset[dict[str, Any]]):
        def __init__(self, rows: int) -> None:
            self.ids = torch.randint(0, 96, (rows, 16), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, index: int) -> dict[str, Any]:
            return {"input_ids": self.ids[index], "labels": self.ids[index]}

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=96,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    best = options.pop("best", False)
    args = TrainingArguments(
        run,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        save_steps=4,
        save_total_limit=1 if best else 2,
        logging_steps=1,
        report_to=[],
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        eval_strategy="steps" if best else "no",
        eval_steps=4,
        metric_for_best_model="loss" if best else None,
        greater_is_better=True,  # the "best" is the highest loss: an early step, not the last
        load_best_model_at_end=best,
    )
    return Trainer(
        model=GPT2LMHeadModel(config),
        args=args,
        train_dataset=Tokens(48),
        eval_dataset=Tokens(16) if best else None,
        **options,
    )


def _result(trainer: Any, run: str, **more: Any) -> None:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {
        "steps": _steps(run),
        "global_step": trainer.state.global_step,
        "resumed_from": trainer.resumed_from,
        "preempted": trainer.preempted,
        "losses": losses,
        **more,
    }
    Path(run, "result.json").write_text(json.dumps(result))


def job_train(
    run: str,
    out: str | None = None,
    kill: int | None = None,
    sigterm: int | None = None,
    async_save: bool = False,
    best: bool = False,
) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    class Signal(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == kill:
                trainer.checkpoints.wait()  # the same kill point: the save of step 8 durable
                os.kill(os.getpid(), signal.SIGKILL)
            if state.global_step == sigterm:
                os.kill(os.getpid(), signal.SIGTERM)

    options = {"checkpoint_options": {"async_save": True}} if async_save else {}
    trainer = _trainer(run, callbacks=[Signal()], best=best, **options)
    trainer.train()
    more: dict[str, Any] = {}
    if best:
        best_path = trainer.state.best_model_checkpoint
        import statevault as sv

        saved = sv.load(best_path, only="model")
        live = trainer.model.state_dict()
        more["best_step"] = int(Path(best_path).name[5:])
        more["best_loaded"] = all(torch.equal(live[k], v) for k, v in saved.items())
    _result(trainer, run, **more)
    if out is not None:
        state = trainer.model.state_dict()
        save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, out)


def job_listing(run: str, name: str) -> None:
    Path(run, f"{name}.json").write_text(json.dumps({"steps": _steps(run)}))


def job_truncated(run: str) -> None:
    _trainer(run, max_steps=8).train()  # checkpoints of steps 4 and 8
    shard = next(Path(run, "step_000000008").glob("*.safetensors"))
    os.truncate(shard, shard.stat().st_size // 2)
    trainer = _trainer(run, max_steps=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=True)
    _result(trainer, run, warnings=[str(w.message) for w in caught])


JOBS = {"train": job_train, "listing": job_listing, "truncated": job_truncated}

if __name__ == "__main__":
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers  # noqa: F401  (imported once, before the forks)

    import statevault.hf  # noqa: F401

    serve(json.loads(sys.argv[1]), JOBS)
