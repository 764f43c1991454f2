"""Read PyTorch files for import: ``torch.save`` files and DCP directories.

A ``torch.save`` file is read with ``torch.load(weights_only=True)``: torch's restricted
unpickler, which builds tensors, containers and plain values only and refuses anything else
(arbitrary classes, functions), so nothing in the file can run code. A TorchScript archive
(``torch.jit.save``) holds code and is refused before torch opens it.

A DCP (``torch.distributed.checkpoint``) directory is read with DCP's own reader, in one process
(``no_dist``), every tensor consolidated to its full size. **DCP's ``.metadata`` file is a
pickle** that DCP loads with the ordinary unpickler: importing a DCP directory trusts its source
exactly as ``torch.distributed.checkpoint.load`` does, which is why only an explicit
``from_="dcp"`` reads one (:mod:`statevault.interop.importing` never detects it). The statevault
checkpoint written from it carries no pickle.

Every read runs :func:`~statevault.interop.foreign.quietly`: torch's warnings and log records
never reach the terminal; a warning that explains a failure is quoted in the error.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from typing import Any

from statevault.errors import CheckpointError, CorruptCheckpointError
from statevault.interop.foreign import Captured, clean, quietly, shorten
from statevault.interop.progress import ByteProgress, Capped

DCP_METADATA = ".metadata"
_TORCHSCRIPT_RECORD = "constants.pkl"  # what torch.serialization._is_torchscript_zip looks for
# Lines of torch's weights-only refusal that say nothing about this file.
_BOILERPLATE = (
    "weights only load failed",
    "in pytorch 2.6",
    "(1)",
    "(2)",
    "please file an issue",
    "check the documentation",
)


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


def read_torch_file(path: str, progress: ByteProgress | None = None) -> Any:
    """What ``torch.save`` wrote at ``path``, through torch's weights-only unpickler.
    ``progress`` is told the file's size, then the bytes torch reads as it reads them."""
    torch = _torch()
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a file (a torch.save file was expected)")
    _refuse_torchscript(path)
    with quietly() as captured:
        try:
            if progress is None:  # torch reads a path natively, faster than through Python
                return torch.load(path, map_location="cpu", weights_only=True)
            counter = Capped(progress, os.path.getsize(path))
            with _CountingFile(path, counter) as source:
                state = torch.load(source, map_location="cpu", weights_only=True)
            counter.finish()
            return state
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"torch.load(weights_only=True) refuses {path}: {_weights_only_reason(exc)}"
                f"{_warned(captured)}. statevault never runs pickled code: in a trusted "
                "environment, load it with torch.load and save its tensors and plain values "
                "with sv.save"
            ) from None
        except Exception as exc:  # torch.load fails on damaged input with any exception type
            raise CheckpointError(
                f"cannot read {path} as a torch.save file ({_describe(exc)}){_warned(captured)}"
            ) from None


def _refuse_torchscript(path: str) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return  # a legacy pickle stream, or damage: torch.load says which
    if any(name.rsplit("/", 1)[-1] == _TORCHSCRIPT_RECORD for name in names):
        raise CheckpointError(
            f"{path} is a TorchScript archive (torch.jit.save), not a torch.save file: it holds "
            "code, which statevault never runs. In a trusted environment, load it with "
            "torch.jit.load and save its state_dict() with sv.save"
        )


class _CountingFile(io.FileIO):
    """A file that tells a progress object how many bytes were read from it."""

    def __init__(self, path: str, counter: Capped) -> None:
        super().__init__(path, "rb")
        self.counter = counter

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.counter.advance(len(data or b""))
        return data or b""

    def readinto(self, buffer: Any) -> int | None:
        count = super().readinto(buffer)
        self.counter.advance(count or 0)
        return count


def _weights_only_reason(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that names what it refused (an unsupported
    global or opcode), without the advice to turn the safety off."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    for line in text.splitlines():
        line = clean(line)
        if line and not line.lower().startswith(_BOILERPLATE):
            return shorten(line.split(". Please use ", 1)[0].rstrip("."))
    return _describe(exc)


def _describe(exc: BaseException) -> str:
    first = next((clean(line) for line in str(exc).splitlines() if clean(line)), "")
    return f"{type(exc).__name__}: {shorten(first)}" if first else type(exc).__name__


def _warned(captured: Captured) -> str:
    notes = captured.notes()
    return f"; torch warned: {' / '.join(notes[:2])}" if notes else ""


def read_dcp(path: str) -> dict[str, Any]:
    """The full state dict of the DCP checkpoint directory ``path`` (see the module's warning:
    its metadata is unpickled). A directory DCP cannot read raises CorruptCheckpointError."""
    _torch()
    if not is_dcp_directory(path):
        raise CheckpointError(f"{path} is not a DCP checkpoint: it has no {DCP_METADATA} file")
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    with quietly() as captured:
        try:
            _load_state_dict(
                state,
                storage_reader=FileSystemReader(path),
                planner=_EmptyStateDictLoadPlanner(),  # type: ignore[no-untyped-call]
                no_dist=True,
            )
        # CheckpointException is a BaseException, not an Exception: named, or it escapes as
        # a traceback. DCP also raises pickle, OS and assertion errors of its own.
        except (CheckpointException, Exception) as exc:
            raise CorruptCheckpointError(
                f"cannot read the DCP checkpoint {path} (damaged or incomplete): "
                f"{_dcp_reason(exc)}{_warned(captured)}"
            ) from None
    return state


def _dcp_reason(exc: BaseException) -> str:
    """What failed, without the tracebacks that CheckpointException's text carries: the
    failure of each rank (one here) as ``Type: message``."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return _describe(exc)
    reasons = []
    for wrapped in failures.values():
        cause = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
        reasons.append(_describe(cause) if isinstance(cause, BaseException) else str(cause))
    return "; ".join(dict.fromkeys(reasons))
