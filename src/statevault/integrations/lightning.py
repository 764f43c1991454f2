"""A Lightning ``CheckpointIO`` that writes statevault checkpoints (see README, "Lightning").
Imported as ``statevault.lightning``. Example::

    import lightning.pytorch as pl
    import statevault.lightning as svl

    trainer = pl.Trainer(plugins=[svl.CheckpointIO(async_save=True)],
                         callbacks=[ModelCheckpoint(every_n_train_steps=100, save_last=True)])
    trainer.fit(model, data, ckpt_path="last")

Each path Lightning names (``epoch=0-step=100.ckpt``, ``last.ckpt``) becomes a statevault
checkpoint *directory*: a manifest and safetensors shards, committed by one atomic rename
(replacing ``last.ckpt`` swaps the old one out in one step), every byte checksummed, no pickle.
The whole dict Lightning builds is saved as a tree of exact types (loops, callbacks, optimizer
and scheduler states, the AMP scaler, hyper-parameters); a dict subclass there is saved as a
dict, and a value the format cannot hold raises an error naming its key path.

``async_save=True``: ``save_checkpoint`` returns once the dict is staged (copied); a background
thread writes and commits it. Training may change its state meanwhile: no lock is needed, and a
checkpoint never mixes steps. Loading or removing a path first waits for its save in flight;
``teardown`` (end of ``fit``) waits for every save. Only rank 0 calls a ``CheckpointIO`` in
Lightning's DDP, so saves here are never collective.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

try:
    import lightning
    from lightning.pytorch.plugins.io import CheckpointIO as LightningCheckpointIO
except ImportError as exc:  # pragma: no cover - the extra is installed wherever tests run
    raise ImportError(
        f"statevault.lightning needs Lightning ({exc}): pip install 'statevault[lightning]'"
    ) from exc

from statevault.checkpoint.load import load
from statevault.errors import CheckpointError
from statevault.integrations.paths import remove_checkpoint, sweep_dead_saves
from statevault.integrations.saves import PathSaves

__all__ = ["CheckpointIO", "plain_tree"]


class CheckpointIO(LightningCheckpointIO):
    """Lightning checkpoint IO through statevault: ``Trainer(plugins=[CheckpointIO()])``.

    ``async_save``: save in the background (``save_checkpoint`` returns once staged).
    ``max_in_flight``: background saves at once (a top-k and a ``last`` save of one step do
    not wait for each other); each stages its own copy. ``verify``: check every checksum on
    load. ``staging_budget_bytes``: staging memory of the background saves together.
    ``storage_options``: for fsspec URLs (``s3://...``) given as ``dirpath``.
    """

    def __init__(
        self,
        *,
        async_save: bool = False,
        max_in_flight: int = 2,
        verify: bool = True,
        staging_budget_bytes: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.async_save = async_save
        self.verify = verify
        self._storage_options = dict(storage_options or {})
        self._saves = PathSaves(
            asynchronous=async_save,
            max_in_flight=max_in_flight,
            staging_budget_bytes=staging_budget_bytes,
            storage_options=storage_options,
        )
        self._swept: set[str] = set()

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | os.PathLike[str],
        storage_options: Any | None = None,
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "statevault.lightning.CheckpointIO takes no storage_options per save; pass "
                "storage_options= (fsspec options) to CheckpointIO() instead"
            )
        self._sweep_once(path)
        metadata = {"writer": "statevault.lightning", "lightning": lightning.__version__}
        self._saves.save(plain_tree(checkpoint), path, metadata=metadata)

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """The checkpoint dict saved at ``path``, every byte verified. ``weights_only`` is
        accepted for Lightning's sake and changes nothing: nothing here runs pickle."""
        target = self._saves.location(path)
        self._saves.settle(target.url)
        if target.local and os.path.isfile(target.path):
            raise CheckpointError(
                f"{target.url} is a file, not a statevault checkpoint (one is a directory): "
                "it was saved by another CheckpointIO; load it with that one, or convert it "
                f"with `statevault import {target.url} --to NEW_PATH`"
            )
        loaded = load(
            path,
            device=_device(map_location),
            verify=self.verify,
            storage_options=self._storage_options or None,
        )
        return dict(loaded)

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete the checkpoint at ``path`` (after its save in flight, if any), uncommitted
        first in one atomic step; anything statevault did not write is left with a warning."""
        target = self._saves.location(path)
        self._saves.settle(target.url)
        remove_checkpoint(target)

    def wait(self) -> None:
        """Block until every save in flight is durable; raises a background failure."""
        self._saves.wait()

    def teardown(self) -> None:
        """End of ``fit``: wait for every save, then free the staging memory."""
        self._saves.close()

    def _sweep_once(self, path: str | os.PathLike[str]) -> None:
        target = self._saves.location(path)
        if not target.local:
            return
        directory = os.path.dirname(target.path)
        if directory not in self._swept:
            self._swept.add(directory)
            sweep_dead_saves(directory)


def plain_tree(value: Any) -> Any:
    """``value`` with dict subclasses as dicts, list subclasses as lists and tuple subclasses
    without fields (``torch.Size``) as tuples; everything else as it is."""
    kind = type(value)
    if kind is dict or kind is OrderedDict:
        converted = kind((k, plain_tree(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):  # torch's state-dict versions
            setattr(converted, "_metadata", value._metadata)  # noqa: B010
        return converted
    if isinstance(value, Mapping):
        return {k: plain_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_tree(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(plain_tree(v) for v in value)
    return value


def _device(map_location: Any) -> str | None:
    if map_location is None:
        return None
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    raise TypeError(
        "statevault.lightning.CheckpointIO.load_checkpoint takes map_location as None, a "
        f"device name or a torch.device, not {type(map_location).__name__}"
    )
