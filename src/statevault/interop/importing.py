"""Import checkpoints of other tools as statevault checkpoints.

Steps: detect the source's format (unless given) -> read it completely into memory with that
format's safe reader -> save it with :func:`statevault.save` (atomic: on any failure nothing is
written at the target). The sources and what becomes of them:

=============  =============================================================================
``tf``         a TensorFlow checkpoint prefix (``ckpt-1`` with ``ckpt-1.index``), or a
               directory with a ``checkpoint`` file (its latest): ``{variable name: array}``
``safetensors`` a ``.safetensors`` file: ``{name: array}``; its ``__metadata__`` is kept in the
               checkpoint's metadata
``torch``      a ``torch.save`` file, read with ``torch.load(weights_only=True)``: its tree as
               it is (dicts, lists, tensors, plain values)
``dcp``        a ``torch.distributed.checkpoint`` directory, consolidated: its state dict.
               DCP's metadata is a pickle: importing trusts the source as DCP's load does,
               so a DCP directory is never detected; it is read only with ``from_="dcp"``
=============  =============================================================================

The checkpoint's metadata records ``{"import": {"from": kind, "source": path}}`` (and
``"safetensors_metadata"`` for a safetensors file).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from statevault.checkpoint.save import save
from statevault.errors import CheckpointError
from statevault.interop import source_safetensors, source_tf, source_torch
from statevault.interop.progress import ByteProgress, Capped, NoProgress

SOURCES = ("tf", "safetensors", "torch", "dcp")


@dataclass
class ImportReport:
    """What an import read and wrote: the source's kind, ``arrays`` saved, ``skipped`` names
    (a TF checkpoint's object graph and string tensors)."""

    source: str
    target: str
    kind: str
    arrays: int = 0
    skipped: list[str] = field(default_factory=list)


def detect(source: str) -> str:
    """The kind of checkpoint at ``source``: ``"tf"``, ``"safetensors"`` or ``"torch"``, never
    ``"dcp"`` (CheckpointError when none, and for a DCP directory: see :func:`refuse_dcp`)."""
    if source_torch.is_dcp_directory(source):
        refuse_dcp(source)
    if source_tf.resolve_prefix(source) is not None:
        return "tf"
    if not os.path.exists(source):
        raise CheckpointError(f"nothing to import at {source}")
    if os.path.isfile(source):
        if source_safetensors.looks_like_safetensors(source):
            return "safetensors"
        if source_torch.looks_like_torch_file(source):
            return "torch"
    raise CheckpointError(
        f"cannot tell what kind of checkpoint {source} is (not a TensorFlow checkpoint prefix, "
        "a safetensors file or a torch.save file): name it with from_=... (--from)"
    )


def refuse_dcp(source: str) -> None:
    """Raise for a DCP directory met without an explicit ``from_="dcp"``: its ``.metadata`` is
    a pickle, and unpickling runs whatever code it names, so reading it must be a decision."""
    raise CheckpointError(
        f"{source} is a torch.distributed.checkpoint (DCP) directory, and DCP's .metadata is a "
        "pickle: loading it runs any code it holds, so statevault never reads one it was not "
        "told to. If you trust this directory, pass --from dcp (from_='dcp')"
    )


def import_checkpoint(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    from_: str | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    progress: ByteProgress | None = None,
) -> ImportReport:
    """Convert the checkpoint at ``source`` (a local path) into a statevault checkpoint at
    ``target`` (a path or URL). ``from_``: ``"tf"``, ``"safetensors"``, ``"torch"`` or
    ``"dcp"``; detected when None, except ``"dcp"``, which must be named (its metadata is a
    pickle). ``progress`` (a :class:`~statevault.interop.progress.ByteProgress`) follows the
    read of the source, in bytes: of the arrays for tf and safetensors, of the file for torch,
    of the data files for dcp (all at once: DCP reads in one call). Example::

        import_checkpoint("pytorch_model.bin", "ckpt/imported")        # torch.save file
        state = sv.load("ckpt/imported")
    """
    path = os.fspath(source)
    kind = from_ if from_ is not None else detect(path)
    if kind not in SOURCES:
        raise CheckpointError(f"unknown source kind {kind!r}: choose one of {', '.join(SOURCES)}")
    state, metadata, skipped = _read(kind, path, progress)
    metadata = {"import": {"from": kind, "source": os.path.abspath(path)}, **metadata}
    written = save(
        state, target, metadata=metadata, overwrite=overwrite, storage_options=storage_options
    )
    arrays = len(written.tensors) + len(written.sharded)
    return ImportReport(path, str(os.fspath(target)), kind, arrays, skipped)


def _read(
    kind: str, path: str, progress: ByteProgress | None
) -> tuple[Any, dict[str, Any], list[str]]:
    if kind == "tf":
        arrays, skipped = source_tf.read(path, progress or NoProgress())
        return arrays, {}, skipped
    if kind == "safetensors":
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is not a file (a safetensors file was expected)")
        arrays_st, header_metadata = source_safetensors.read(path, progress or NoProgress())
        return arrays_st, {"safetensors_metadata": header_metadata}, []
    if kind == "torch":
        return source_torch.read_torch_file(path, progress), {}, []
    counter = Capped(progress or NoProgress(), _data_bytes(path))  # DCP reads in one call
    state = source_torch.read_dcp(path)
    counter.finish()
    return state, {}, []


def _data_bytes(directory: str) -> int:
    """The bytes of a DCP directory's data files; 0 for what cannot be listed or read (the
    reader then says what is wrong)."""
    total = 0
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name != source_torch.DCP_METADATA and entry.is_file():
                total += entry.stat().st_size
    return total
