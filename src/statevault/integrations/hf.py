"""The Hugging Face ``Trainer`` with statevault checkpoints (see README, "Hugging Face Trainer").
Imported as ``statevault.hf``. Example::

    from statevault.hf import Trainer

    trainer = Trainer(model=model, args=TrainingArguments("out", save_steps=100,
                      save_total_limit=3), train_dataset=data)
    trainer.train()  # resumes from the newest valid checkpoint of out/, if there is one

A drop-in subclass: checkpoints are saved by a :class:`~statevault.CheckpointManager` on
``args.output_dir`` (``out/step_000000100/``: atomic, checksummed, no pickle), with
``save_total_limit`` as ``max_to_keep`` and the best checkpoint by ``metric_for_best_model``
kept too. A checkpoint holds the model's state dict, the optimizer, the LR scheduler, the AMP
scaler, every random stream, the ``TrainerState`` (JSON) and the training arguments (JSON).

Resuming is HF's own: ``train()`` (or ``train(resume_from_checkpoint=True)``) finds the newest
checkpoint that passes its checksums (a damaged one is skipped with a warning; an interrupted
save never became one), hands its ``TrainerState`` to HF's loop, which skips the batches already
trained, and the private loaders below restore from the loaded checkpoint instead of HF's files.
``train(resume_from_checkpoint=False)`` starts afresh; a path to a statevault checkpoint resumes
from it; any other path is HF's own checkpoint format, loaded by HF.

Private ``transformers.Trainer`` methods overridden (tested with transformers 5.25):
``_save_checkpoint``, ``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``,
``_load_scaler``, ``_load_rng_state`` and ``_load_best_model``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

try:
    import transformers
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - the extra is installed wherever tests run
    raise ImportError(
        f"statevault.hf needs transformers ({exc}): pip install 'statevault[hf]'"
    ) from exc

from statevault.checkpoint.load import load
from statevault.checkpoint.restore import restore_into
from statevault.format.names import MANIFEST_NAME
from statevault.manager import CheckpointManager
from statevault.state.rng import RNGState

__all__ = ["Trainer"]
_TRAINER_STATE = "trainer_state.json"


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` saving and resuming through statevault (module docstring).

    ``checkpoint_options``: more :class:`~statevault.CheckpointManager` options, such as
    ``{"async_save": True}`` (training goes on while a checkpoint is written),
    ``replicate_to=`` (a second tier on an object store) or ``storage_options=``. The run
    directory is ``args.output_dir``; ``max_to_keep`` defaults to ``save_total_limit``.
    """

    def __init__(
        self, *args: Any, checkpoint_options: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_options = dict(checkpoint_options or {})
        self.checkpoints: CheckpointManager | None = None  # open during train()
        self.preempted = False  # the last train() stopped for SIGTERM/SIGUSR1, after a save
        self.resumed_from: str | None = None  # the checkpoint the last train() resumed from
        self._resumed: dict[str, Any] | None = None  # the checkpoint being resumed from
        self._view: str | None = None  # the directory HF reads trainer_state.json from
        self.add_callback(_StopOnPreemption(self))

    # ---- train -------------------------------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``transformers.Trainer.train``, resumed from the newest valid checkpoint unless
        ``resume_from_checkpoint=False`` (see the module docstring)."""
        self._check_supported()
        self.checkpoints = self._open_manager(trial)
        self.preempted, self.resumed_from = False, None
        try:
            resume = self._resume_point(resume_from_checkpoint)
            output = super().train(
                resume_from_checkpoint=resume,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
            self.preempted = self.checkpoints.preempted
            return output
        finally:
            self._resumed = None
            if self._view is not None:
                shutil.rmtree(self._view, ignore_errors=True)
                self._view = None
            self.checkpoints.close()  # waits for a save in flight
            self.checkpoints = None

    def _open_manager(self, trial: Any) -> CheckpointManager:
        args = self.args
        options: dict[str, Any] = {"max_to_keep": args.save_total_limit}
        if args.metric_for_best_model is not None:
            options["best_metric"] = _eval_key(args.metric_for_best_model)
            options["best_mode"] = "max" if args.greater_is_better else "min"
        options.update(self.checkpoint_options)
        return CheckpointManager(self._get_output_dir(trial=trial), **options)

    def _resume_point(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """What to hand HF's ``train``: None (a fresh start), a view directory holding the
        resumed checkpoint's ``trainer_state.json``, or the caller's path to HF's format."""
        if resume_from_checkpoint is False:
            return None
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            path = os.fspath(resume_from_checkpoint)
            if not os.path.isfile(os.path.join(path, MANIFEST_NAME)):
                return path  # HF's own checkpoint format: HF loads it
            tree, self.resumed_from = load(path), path
        else:
            assert self.checkpoints is not None
            restored = self.checkpoints.restore()  # the newest checkpoint that verifies
            if restored is None:
                if resume_from_checkpoint is True:
                    raise ValueError(
                        f"No valid checkpoint found in output directory ({self.args.output_dir})"
                    )
                return None
            tree, self.resumed_from = restored.state, restored.path
        self._resumed = dict(tree)
        self._view = tempfile.mkdtemp(prefix="statevault-hf-resume-")
        with open(os.path.join(self._view, _TRAINER_STATE), "w", encoding="utf-8") as handle:
            handle.write(self._resumed["trainer_state"])
        return self._view

    def _check_supported(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError(
                "statevault.hf.Trainer does not checkpoint DeepSpeed or FSDP training yet: "
                "use transformers.Trainer there"
            )

    # ---- save --------------------------------------------------------------------------------

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        if self.checkpoints is None:
            raise RuntimeError("statevault.hf.Trainer saves checkpoints only inside train()")
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        step = self.state.global_step
        best = self.state.best_global_step
        if best and (best == step or best in self.checkpoints.all_steps()):
            self.state.best_model_checkpoint = self.checkpoints.path(best)
        self._update_stateful_callbacks()
        self.checkpoints.save(step, self._checkpoint_state(), metrics=self._metrics(), force=True)

    def _checkpoint_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": self.accelerator.unwrap_model(self.model),
            "trainer_state": _state_json(self.state),
            "training_args": self.args.to_json_string(),  # type: ignore[no-untyped-call]
        }
        if not self.args.save_only_model:
            state["optimizer"] = self.optimizer
            state["scheduler"] = self.lr_scheduler
            state["rng"] = RNGState()
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler
        return state

    def _update_stateful_callbacks(self) -> None:
        """What HF's ``_save_checkpoint`` does before writing ``trainer_state.json``."""
        stateful: Any = self.state.stateful_callbacks  # a dict by name (typed as a list)
        for callback in [*self.callback_handler.callbacks, self.control]:
            if not isinstance(callback, ExportableState):
                continue
            name = type(callback).__name__
            if isinstance(stateful.get(name), list):
                stateful[name].append(callback.state())
            else:
                stateful[name] = callback.state()

    def _metrics(self) -> dict[str, float]:
        """The numbers logged at this step (evaluation results), for best-N retention."""
        metrics: dict[str, float] = {}
        for entry in self.state.log_history:
            if entry.get("step") == self.state.global_step:
                metrics.update(
                    {k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}
                )
        return metrics

    # ---- resume (HF calls these with the path train() handed it) ---------------------------

    def _ours(self, checkpoint: str | None) -> dict[str, Any] | None:
        if checkpoint is not None and checkpoint == self._view:
            return self._resumed
        return None

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        tree = self._ours(resume_from_checkpoint)
        if tree is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        target = model if model is not None else self.model
        restore_into({"model": target}, {"model": tree["model"]}, strict=True)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        tree = self._ours(checkpoint)
        if tree is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        parts = {"optimizer": self.optimizer, "scheduler": self.lr_scheduler}
        present = {k: v for k, v in parts.items() if k in tree}
        restore_into(present, {k: tree[k] for k in present}, strict=True)

    def _load_scaler(self, checkpoint: str | None) -> None:
        tree = self._ours(checkpoint)
        if tree is None:
            super()._load_scaler(checkpoint)
            return
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "scaler" in tree:
            restore_into({"scaler": scaler}, {"scaler": tree["scaler"]}, strict=True)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        tree = self._ours(checkpoint)
        if tree is None:
            super()._load_rng_state(checkpoint)
            return
        if "rng" in tree:
            restore_into({"rng": RNGState()}, {"rng": tree["rng"]}, strict=True)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not os.path.isfile(os.path.join(best, MANIFEST_NAME)):
            super()._load_best_model()
            return
        load(best, only="model", into=self.accelerator.unwrap_model(self.model))


class _StopOnPreemption(transformers.TrainerCallback):
    """A preemption signal (SIGTERM, SIGUSR1: the manager's) makes HF save after the current
    step and stop; ``trainer.preempted`` then says so."""

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        manager = self._trainer.checkpoints
        if manager is not None and manager.preemption_requested:
            control.should_save = True
            control.should_training_stop = True
        return control


def _eval_key(metric: str) -> str:
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def _state_json(state: Any) -> str:
    """``trainer_state.json`` as HF writes it."""
    import dataclasses

    return json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"
