"""Read PyTorch files for import: ``torch.save`` files and DCP directories.

A ``torch.save`` file is read with ``torch.load(weights_only=True)``: torch's restricted
unpickler, which builds tensors, containers and plain values only and refuses anything else
(arbitrary classes, functions), so nothing in the file can run code.

A DCP (``torch.distributed.checkpoint``) directory is read with DCP's own reader, in one process
(``no_dist``), every tensor consolidated to its full size. **DCP's ``.metadata`` file is a
pickle** that DCP loads with the ordinary unpickler: importing a DCP directory trusts its source
exactly as ``torch.distributed.checkpoint.load`` does. Import only DCP checkpoints you would
load with DCP; the statevault checkpoint written from it carries no pickle.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

from statevault.errors import CheckpointError

DCP_METADATA = ".metadata"


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            "importing PyTorch files needs torch: pip install 'statevault[torch]'"
        ) from None
    return torch


def looks_like_torch_file(path: str) -> bool:
    """A zip archive (torch.save's format since 1.6) or a legacy pickle stream."""
    if not os.path.isfile(path):
        return False
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as source:
        return source.read(1) == b"\x80"


def is_dcp_directory(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, DCP_METADATA))


def read_torch_file(path: str) -> Any:
    """What ``torch.save`` wrote at ``path``, through torch's weights-only unpickler."""
    torch = _torch()
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a file (a torch.save file was expected)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} holds more than weights, which torch.load(weights_only=True) refuses to "
            f"unpickle ({first}). statevault never runs pickled code: in a trusted environment, "
            "load it with torch.load and save its tensors and plain values with sv.save"
        ) from None
    except Exception as exc:  # torch.load fails on damaged input with any exception type
        detail = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"cannot read {path} as a torch.save file ({detail})") from None


def read_dcp(path: str) -> dict[str, Any]:
    """The full state dict of the DCP checkpoint directory ``path`` (see the module's warning:
    its metadata is unpickled)."""
    _torch()
    if not is_dcp_directory(path):
        raise CheckpointError(f"{path} is not a DCP checkpoint: it has no {DCP_METADATA} file")
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:
        _load_state_dict(
            state,
            storage_reader=FileSystemReader(path),
            planner=_EmptyStateDictLoadPlanner(),  # type: ignore[no-untyped-call]
            no_dist=True,
        )
    except Exception as exc:  # DCP raises CheckpointException, pickle and OS errors alike
        raise CheckpointError(f"cannot read the DCP checkpoint {path}: {exc}") from None
    return state
