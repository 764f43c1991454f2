"""Load: open -> read every tensor it needs, verified -> decode the tree -> restore into.

A checkpoint replaced or deleted while it is read (an overwrite, a retention) is read again
from its path: a load sees one whole checkpoint, never a mix (checkpoint/open.py). Example::

    state = load("ckpt/epoch10", into={"model": model, "optimizer": opt})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from statevault.checkpoint.needed_ranks import own_branch_rank, read_needed_ranks
from statevault.checkpoint.open import READ_ATTEMPTS, OpenCheckpoint, PathLike, open_checkpoint
from statevault.checkpoint.read import decode, read_tensors
from statevault.checkpoint.restore import LoadedState, restore_into
from statevault.distributed.group import rank_and_world, rank_picker
from statevault.errors import CheckpointError, CorruptCheckpointError
from statevault.format import tree_paths


def load(
    path: PathLike,
    *,
    into: Any = None,
    device: str | None = None,
    strict: bool = True,
    verify: bool = True,
    only: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Load the checkpoint at ``path``: the saved tree, tensors and plain values included.

    ``into``: objects to restore in place (Stateful via load_state_dict, tensors copied into),
    or the one object the checkpoint's root was saved from: ``sv.load(p, into=model)`` after
    ``sv.save(model, p)``.
    ``device``: where returned tensors go (default: CPU). ``verify``: check every checksum.
    ``only``: a key path (``"model"``, ``"optimizer/state"``): load just that subtree, reading
    only its tensors' bytes (``into`` then mirrors the subtree). Example::

        state = sv.load("ckpt/epoch10", into={"model": model, "optimizer": opt})
        epoch = state["epoch"]
        weights = sv.load("ckpt/epoch10", only="model")
    """
    for attempt in range(1, READ_ATTEMPTS + 1):
        # Format 3: no per-rank index yet; _read_tree reads those the load needs.
        with open_checkpoint(path, storage_options, ranks=()) as checkpoint:
            try:
                loaded = _read_tree(checkpoint, into, device, verify, only)
                break
            except CorruptCheckpointError:
                if attempt == READ_ATTEMPTS or checkpoint.still_current():
                    raise
                # replaced or deleted while it was read: read the one now at the path
    if into is None:
        return LoadedState(loaded) if type(loaded) is dict else loaded
    return restore_into(into, loaded, strict=strict)


def _read_tree(
    checkpoint: OpenCheckpoint,
    into: Any,
    device: str | None,
    verify: bool,
    only: str | None,
) -> Any:
    """The tree of ``checkpoint`` (or its subtree ``only``), every tensor read and verified."""
    pick_rank = rank_picker(checkpoint.directory)
    if not checkpoint.manifest.complete:  # format 3: this process's own per-rank branch first
        checkpoint.read_ranks(own_branch_rank(checkpoint))
    node = _selected(checkpoint, only)
    if not checkpoint.manifest.complete:  # then the indexes of the pieces it loads
        read_needed_ranks(checkpoint, node, into, pick_rank)
        node = _selected(checkpoint, only)
    tensors = read_tensors(checkpoint, node, into, device, verify, pick_rank, only is None)
    return decode(checkpoint, tensors.plain, node, tensors.sharded, pick_rank)


def _selected(checkpoint: OpenCheckpoint, only: str | None) -> Any:
    """The tree, or its subtree ``only``, of the manifest as expanded so far."""
    node = checkpoint.manifest.tree
    if only is None:
        return node
    try:
        return tree_paths.subtree(node, only, checkpoint.directory, rank_and_world()[0])
    except KeyError as exc:
        raise CheckpointError(str(exc.args[0])) from None
