"""Export a checkpoint's arrays as safetensors: one file, or HF-style shards with an index.

Steps: open (manifest, validated) -> pick the subtree (``only``) -> collect its arrays by key
path -> plan the files -> stream each file (header first, then array by array, slab by slab;
see :mod:`statevault.interop.writer`) -> rename into place. Sharded tensors (format 2) are
consolidated into full tensors; plain values, numpy scalars and per-rank subtrees are skipped
and counted. Nothing but the checkpoint's manifest and the bytes of the exported arrays is read,
every byte verified against its checksum.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from statevault.checkpoint import OpenCheckpoint, open_checkpoint
from statevault.distributed.reshard import Logical, plain_logical, sharded_logical
from statevault.engine.regions import RegionReader
from statevault.errors import CheckpointError, CheckpointExistsError, UnsupportedValueError
from statevault.format import dtypes
from statevault.format import tree as tree_codec
from statevault.interop import casting
from statevault.interop.leaves import collect
from statevault.interop.writer import DEFAULT_BUFFER_BYTES, Item, write_file
from statevault.storage.local import fsync_dir
from statevault.storage.location import local_directory

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's default "5GB"


@dataclass
class ExportReport:
    """What an export wrote: ``files`` (paths), ``tensors`` exported, ``bytes`` of array data,
    and ``skipped``: values that are not arrays, by kind (``value``, ``per_rank``)."""

    source: str
    target: str
    format: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


def export_safetensors(
    path: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    only: str | None = None,
    dtype: str = "keep",
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> ExportReport:
    """Write every array of the checkpoint at ``path`` (or of its subtree ``only``) into the
    safetensors file ``target``, named by key path relative to ``only``.

    Memory stays at about twice ``buffer_bytes`` (the slab, and the verified read it is copied
    from, widened to whole checksum blocks) whatever the size of the checkpoint. A tensor
    reached by two key paths (tied weights) is written under both names. Example::

        report = export_safetensors("ckpt/step_1000", "model.safetensors", only="model")
        weights = safetensors.torch.load_file("model.safetensors")  # {"0.weight": ..., ...}
    """
    destination = _local_target(target, overwrite)
    checkpoint = open_checkpoint(path, storage_options)
    items, report = _plan(checkpoint, only, dtype, destination, "safetensors")
    with RegionReader(checkpoint.reader, verify=True) as regions:
        write_file(destination, items, regions, _file_metadata(checkpoint), buffer_bytes)
    fsync_dir(os.path.dirname(destination))
    report.files = [destination]
    return report


def export_hf(
    path: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    only: str | None = None,
    dtype: str = "keep",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> ExportReport:
    """Write the arrays as an HF-style directory ``target``: ``model-00001-of-0000N.safetensors``
    files of at most ``max_shard_bytes`` of data each (an array larger than that gets a file of
    its own) and ``model.safetensors.index.json`` (``{"metadata": {"total_size": n},
    "weight_map": {name: file}}``), which ``transformers``' ``from_pretrained`` reads.

    The directory is written under a temporary name and renamed into place. Example::

        export_hf("ckpt/step_1000", "hf-model", only="model", max_shard_bytes=2 * 10**9)
    """
    if max_shard_bytes <= 0:
        raise CheckpointError(f"the maximum shard size must be positive, got {max_shard_bytes}")
    destination = _local_target(target, overwrite)
    checkpoint = open_checkpoint(path, storage_options)
    items, report = _plan(checkpoint, only, dtype, destination, "hf")
    groups = _split(items, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    staging = f"{destination}.tmp-{uuid.uuid4().hex[:12]}"
    os.mkdir(staging)
    try:
        with RegionReader(checkpoint.reader, verify=True) as regions:
            for name, group in zip(names, groups, strict=True):
                write_file(
                    os.path.join(staging, name),
                    group,
                    regions,
                    _file_metadata(checkpoint),
                    buffer_bytes,
                )
        index = {
            "metadata": {"total_size": report.bytes},
            "weight_map": {
                item.name: name for name, group in zip(names, groups, strict=True) for item in group
            },
        }
        _write_json(os.path.join(staging, INDEX_NAME), index)
        fsync_dir(staging)
        _move_into_place(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.files = [os.path.join(destination, n) for n in [*names, INDEX_NAME]]
    return report


def _plan(
    checkpoint: OpenCheckpoint, only: str | None, dtype: str, target: str, kind: str
) -> tuple[list[Item], ExportReport]:
    casting.check_target(dtype)
    manifest = checkpoint.manifest
    node = manifest.tree
    if only is not None:
        try:
            node = tree_codec.subtree(node, only, checkpoint.directory)
        except KeyError as exc:
            raise CheckpointError(str(exc.args[0])) from None
    leaves = collect(node, checkpoint.directory)
    items: list[Item] = []
    seen: set[str] = set()
    for leaf in leaves.arrays:
        name = leaf.name or (only or "").rsplit("/", 1)[-1] or "tensor"
        if name in seen or name == "__metadata__":
            raise UnsupportedValueError(
                leaf.name or "(root)",
                f"two arrays would both be named {name!r} in the export (key paths are not "
                "unique, or the name is safetensors' reserved __metadata__); export a subtree "
                "with only= or rename the key",
            )
        seen.add(name)
        logical = _logical(checkpoint, leaf.kind, leaf.id)
        out_dtype = casting.output_dtype(logical.entry.dtype, dtype)
        if dtypes.lookup(out_dtype).safetensors is None:
            raise UnsupportedValueError(
                _full_path(only, name),
                f"safetensors has no dtype {out_dtype}, so this array cannot be exported; "
                "export the other arrays with only=, or convert it before saving",
            )
        items.append(Item(name, logical, out_dtype))
    report = ExportReport(
        source=checkpoint.directory,
        target=target,
        format=kind,
        tensors=len(items),
        bytes=sum(item.nbytes for item in items),
        skipped=dict(sorted(leaves.skipped.items())),
    )
    return items, report


def _logical(checkpoint: OpenCheckpoint, kind: str, index: int) -> Logical:
    manifest = checkpoint.manifest
    rows = manifest.sharded if kind == "sharded" else manifest.tensors
    if not 0 <= index < len(rows):
        raise CheckpointError(f"{checkpoint.directory}: the tree refers to {kind} {index}")
    if kind == "sharded":
        return sharded_logical(manifest, index)
    return plain_logical(manifest, index)


def _full_path(only: str | None, name: str) -> str:
    return f"{only.strip('/')}/{name}" if only else name


def _split(items: list[Item], limit: int) -> list[list[Item]]:
    """Items in order, a new group whenever the next one would pass ``limit`` (at least one
    group, so that an export of nothing still writes a valid, empty file)."""
    groups: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    return groups


def _file_metadata(checkpoint: OpenCheckpoint) -> dict[str, str]:
    torch_arrays = any(t.framework == "torch" for t in checkpoint.manifest.tensors)
    return {"format": "pt" if torch_arrays else "np", "writer": "statevault export"}


def _local_target(target: str | os.PathLike[str], overwrite: bool) -> str:
    text = os.fspath(target)
    local = local_directory(text)
    if local is None:
        raise CheckpointError(
            f"export writes to a local path, not {text.split('://', 1)[0]}:// (export to a "
            "local disk, then upload)"
        )
    destination = os.path.abspath(local)
    if os.path.lexists(destination) and not overwrite:
        raise CheckpointExistsError(
            f"{destination} already exists; choose another path or pass overwrite=True "
            "(--overwrite)"
        )
    parent = os.path.dirname(destination)
    if not os.path.isdir(parent):
        raise CheckpointError(f"cannot export to {destination}: {parent} is not a directory")
    return destination


def _write_json(path: str, document: dict[str, Any]) -> None:
    with open(path, "x", encoding="utf-8") as out:
        json.dump(document, out, indent=2)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())


def _move_into_place(staging: str, destination: str) -> None:
    """Rename the finished directory to ``destination``; an existing one (overwrite) is first
    renamed aside, so ``destination`` is always either the old export or the new one."""
    aside = None
    if os.path.lexists(destination):
        aside = f"{destination}.old-{uuid.uuid4().hex[:12]}"
        os.rename(destination, aside)
    os.rename(staging, destination)
    fsync_dir(os.path.dirname(destination))
    if aside is not None:
        if os.path.isdir(aside) and not os.path.islink(aside):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside)
