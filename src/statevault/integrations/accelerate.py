"""``accelerator.save_state`` / ``load_state`` through statevault (see README, "Accelerate").
Imported as ``statevault.accelerate``. Example::

    accelerator = Accelerator(project_config=ProjectConfiguration(
        "runs/exp1", automatic_checkpoint_naming=True, total_limit=3))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    statevault.accelerate.install(accelerator)  # save_state / load_state now write statevault
    accelerator.load_state()                     # the newest valid checkpoint_N, if any
    ...
    accelerator.save_state()

What Accelerate's own ``save_state`` writes, as one statevault checkpoint (a directory: a
manifest and safetensors shards, every byte checksummed, committed atomically, no pickle):
each prepared model's state dict (unwrapped: no ``module.`` prefix, so it loads into any world
size), each optimizer and LR scheduler, the AMP scaler, each registered object
(``register_for_checkpointing``), ``accelerator.step``, each process's random streams and each
data loader's position (a seedable sampler's epoch and seed, a stateful loader's state dict),
per rank. ``register_save_state_pre_hook`` / ``register_load_state_pre_hook`` hooks run as in
Accelerate: a save hook may drop entries of ``weights``, a load hook entries of ``models``.

With ``automatic_checkpoint_naming`` the checkpoint is ``<project_dir>/checkpoints/
checkpoint_<iteration>``; ``total_limit`` deletes the oldest only after the new one is
committed (Accelerate deletes first), and only statevault checkpoints. ``load_state()`` takes
the newest one that verifies (a damaged one is skipped with a warning) and sets the iteration
past it, so that the next ``save_state`` does not collide. Under ``accelerate launch`` (a
process group) every process calls both, as with Accelerate; the ranks write in parallel.
FSDP, DeepSpeed and Megatron-LM keep Accelerate's own checkpointing (refused here).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

from statevault.checkpoint.load import load
from statevault.checkpoint.restore import restore_into
from statevault.errors import CheckpointNotFoundError, CorruptCheckpointError
from statevault.integrations.paths import remove_checkpoint
from statevault.integrations.saves import PathSaves
from statevault.state.per_rank import PerRank
from statevault.state.rng import RNGState

__all__ = ["AcceleratorCheckpoints", "install"]
_NAME = re.compile(r"^checkpoint_(\d+)$")


class AcceleratorCheckpoints:
    """``save_state`` / ``load_state`` of one ``Accelerator``, through statevault.

    ``async_save``: ``save_state`` returns once the state is staged; call :meth:`wait` (or
    :meth:`close`) before the process ends. ``verify``: check every checksum on load."""

    def __init__(
        self,
        accelerator: Any,
        *,
        async_save: bool = False,
        verify: bool = True,
        staging_budget_bytes: int | None = None,
    ) -> None:
        _check_supported(accelerator)
        self.accelerator = accelerator
        self.verify = verify
        collective = accelerator.num_processes > 1
        self._saves = PathSaves(
            asynchronous=async_save,
            max_in_flight=1,
            collective=collective,
            staging_budget_bytes=staging_budget_bytes,
        )

    # ---- save --------------------------------------------------------------------------------

    def save_state(self, output_dir: str | os.PathLike[str] | None = None, **_: Any) -> str:
        """Save the accelerator's whole state; returns the checkpoint's path."""
        target = self._save_target(output_dir)
        self._saves.save(self._state(target), target, metadata={"writer": "statevault.accelerate"})
        self.accelerator.project_configuration.iteration += 1
        if not self._saves.asynchronous:
            self._apply_total_limit()
        return target

    def _save_target(self, output_dir: str | os.PathLike[str] | None) -> str:
        config = self.accelerator.project_configuration
        if not config.automatic_checkpoint_naming:
            if output_dir is None:
                raise ValueError("save_state needs output_dir without automatic_checkpoint_naming")
            return os.fspath(output_dir)
        self._saves.wait()  # the previous save committed before anything is deleted
        self._apply_total_limit(room_for_one=True)
        target = os.path.join(self._root(), f"checkpoint_{config.iteration}")
        if os.path.exists(target):
            raise ValueError(
                f"Checkpoint directory {target} ({config.iteration}) already exists. Please "
                "manually override `accelerator.project_configuration.iteration` with what "
                "iteration to start with."
            )
        return target

    def _state(self, output_dir: str) -> dict[str, Any]:
        acc = self.accelerator
        weights = [acc.unwrap_model(model).state_dict() for model in acc._models]
        for hook in acc._save_model_state_pre_hook.values():
            hook(acc._models, weights, output_dir)
        state: dict[str, Any] = {
            "models": weights,
            "optimizers": [_inner(o, "optimizer") for o in acc._optimizers],
            "schedulers": [_inner(s, "scheduler") for s in acc._schedulers],
            "dataloaders": [PerRank(_Loader(loader)) for loader in acc._dataloaders],
            "custom": list(acc._custom_objects),
            "step": int(acc.step),
            "rng": RNGState(),
        }
        if acc.scaler is not None:
            state["scaler"] = acc.scaler
        return state

    # ---- load --------------------------------------------------------------------------------

    def load_state(self, input_dir: str | os.PathLike[str] | None = None, **_: Any) -> str:
        """Restore the accelerator's whole state from ``input_dir`` (default: the newest valid
        ``checkpoint_N`` with automatic naming); returns the checkpoint's path."""
        self._saves.wait()
        if input_dir is not None:
            path = os.fspath(input_dir)
            self._restore(path)
            return path
        if not self.accelerator.project_configuration.automatic_checkpoint_naming:
            raise ValueError("No input_dir provided and automatic checkpoint naming is disabled.")
        for iteration, path in reversed(self._committed()):
            try:
                self._restore(path)
            except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                warnings.warn(f"statevault: skipping damaged {path}: {exc}", stacklevel=2)
                continue
            self.accelerator.project_configuration.iteration = iteration + 1
            return path
        raise CheckpointNotFoundError(f"no valid checkpoint_N under {self._root()}")

    def _restore(self, path: str) -> None:
        acc = self.accelerator
        models = [acc.unwrap_model(model) for model in acc._models]
        for hook in acc._load_model_state_pre_hook.values():
            hook(models, path)
        tree = load(path, verify=self.verify)
        into: dict[str, Any] = {
            "models": models,
            "optimizers": [_inner(o, "optimizer") for o in acc._optimizers],
            "schedulers": [_inner(s, "scheduler") for s in acc._schedulers],
            "dataloaders": [PerRank(_Loader(loader)) for loader in acc._dataloaders],
            "custom": list(acc._custom_objects),
            "rng": RNGState(),
        }
        if acc.scaler is not None and "scaler" in tree:
            into["scaler"] = acc.scaler
        restore_into({k: v for k, v in into.items() if k in tree}, tree, strict=True)
        acc.step = int(tree["step"])

    # ---- the run -----------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until the save in flight is durable (then apply ``total_limit``)."""
        self._saves.wait()
        self._apply_total_limit()

    def close(self) -> None:
        """:meth:`wait`, then free the staging memory."""
        try:
            self.wait()
        finally:
            self._saves.close()

    def _root(self) -> str:
        return os.path.join(self.accelerator.project_dir, "checkpoints")

    def _committed(self) -> list[tuple[int, str]]:
        """(iteration, path) of the ``checkpoint_N`` directories, oldest first."""
        root = self._root()
        found = []
        for name in os.listdir(root) if os.path.isdir(root) else []:
            match = _NAME.match(name)
            if match is not None and os.path.isdir(os.path.join(root, name)):
                found.append((int(match.group(1)), os.path.join(root, name)))
        return sorted(found)

    def _apply_total_limit(self, room_for_one: bool = False) -> None:
        config = self.accelerator.project_configuration
        limit = config.total_limit
        if not config.automatic_checkpoint_naming or limit is None:
            return
        if not self.accelerator.is_main_process:
            return
        keep = max(limit - (1 if room_for_one else 0), 0)
        committed = self._committed()
        for _, path in committed[: max(len(committed) - keep, 0)]:
            remove_checkpoint(self._saves.location(path))


def install(accelerator: Any, **options: Any) -> AcceleratorCheckpoints:
    """Make ``accelerator.save_state`` / ``load_state`` write and read statevault checkpoints
    (``options``: see :class:`AcceleratorCheckpoints`); returns the object that does it."""
    checkpoints = AcceleratorCheckpoints(accelerator, **options)
    accelerator.save_state = checkpoints.save_state
    accelerator.load_state = checkpoints.load_state
    return checkpoints


class _Loader:
    """A data loader's position: its epoch counter (``iteration``: Accelerate sets the
    sampler's epoch from it at each pass), a seedable sampler's epoch and seed, and the state
    dict of a stateful loader (``use_stateful_dataloader``)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def _sampler(self) -> Any:
        get = getattr(self.loader, "get_sampler", None)
        sampler = get() if callable(get) else None
        return sampler if hasattr(sampler, "initial_seed") else None

    def state_dict(self) -> dict[str, Any]:
        sampler = self._sampler()
        iteration = getattr(self.loader, "iteration", None)
        state: dict[str, Any] = {
            "iteration": int(iteration) if iteration is not None else None,
            "sampler": None,
            "loader": None,
        }
        if sampler is not None:
            state["sampler"] = {"epoch": int(sampler.epoch), "seed": int(sampler.initial_seed)}
        if getattr(self.loader, "use_stateful_dataloader", False):
            state["loader"] = self.loader.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("iteration") is not None and hasattr(self.loader, "iteration"):
            self.loader.iteration = state["iteration"]
        sampler = self._sampler()
        if sampler is not None and state.get("sampler") is not None:
            sampler.epoch = state["sampler"]["epoch"]
            sampler.initial_seed = state["sampler"]["seed"]
        if state.get("loader") is not None:
            self.loader.load_state_dict(state["loader"])


def _inner(wrapper: Any, attribute: str) -> Any:
    """The torch optimizer or scheduler inside Accelerate's wrapper."""
    return getattr(wrapper, attribute, wrapper)


def _check_supported(accelerator: Any) -> None:
    kind = str(getattr(accelerator, "distributed_type", ""))
    if any(name in kind for name in ("FSDP", "DEEPSPEED", "MEGATRON")):
        raise NotImplementedError(
            f"statevault.accelerate does not checkpoint {kind} training yet: use Accelerate's "
            "own save_state there"
        )
