"""Export a checkpoint's arrays as safetensors: one file, or HF-style shards with an index.

Steps: open (manifest, validated) -> pick the subtree (``only``) -> collect its arrays by key
path -> name them -> plan the files -> stream each file (header first, then array by array,
slab by slab; see :mod:`statevault.interop.writer`) -> rename into place. Sharded tensors
(format 2) are consolidated into full tensors; plain values, numpy scalars and per-rank subtrees
are skipped and counted. Nothing but the checkpoint's manifest and the bytes of the exported
arrays is read, every byte verified against its checksum.

Names. A safetensors export names each array by its key path relative to ``only``, as
statevault shows it (``optimizer/state/0/exp_avg``). An HF export names it as HF does, the
parts of the key path joined with dots (``layers.0.weight``), and holds one model: without
``only``, the arrays must all sit at the root (a flat state dict) or all under one top-level key
(which is then exported as if ``only`` named it); arrays under several top-level keys (say
``model`` and ``optimizer``) are refused with a message that lists them.

The target is never a directory statevault did not write: a safetensors export refuses a
directory at its path, and an HF export replaces (``overwrite``) only a directory that holds
nothing but an earlier HF export's files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from statevault.checkpoint import OpenCheckpoint, open_checkpoint
from statevault.engine.regions import RegionReader
from statevault.engine.reshard import Logical, plain_logical, sharded_logical
from statevault.errors import CheckpointError, CheckpointExistsError, UnsupportedValueError
from statevault.format import dtypes, tree_paths
from statevault.interop import casting
from statevault.interop.leaves import Leaf, collect
from statevault.interop.progress import ByteProgress, NoProgress
from statevault.interop.writer import DEFAULT_BUFFER_BYTES, Item, write_file
from statevault.storage.local import fsync_dir
from statevault.storage.location import local_directory

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's default "5GB"
# What an HF export writes into its directory: an overwrite may replace only such a directory.
_HF_FILE = re.compile(r"^model-\d{5,}-of-\d{5,}\.safetensors$")


@dataclass
class ExportReport:
    """What an export wrote: ``files`` (paths), ``tensors`` exported, ``bytes`` of array data,
    ``skipped``: values that are not arrays, by kind (``value``, ``per_rank``), and ``only``:
    the subtree exported (as given, or the one top-level key an HF export found; None: the
    whole tree)."""

    source: str
    target: str
    format: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    only: str | None = None

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
    progress: ByteProgress | None = None,
) -> ExportReport:
    """Write every array of the checkpoint at ``path`` (or of its subtree ``only``) into the
    safetensors file ``target``, named by key path relative to ``only``.

    Memory stays at about twice ``buffer_bytes`` (the slab, and the verified read it is copied
    from, widened to whole checksum blocks) whatever the size of the checkpoint. A tensor
    reached by two key paths (tied weights) is written under both names. ``progress`` (a
    :class:`~statevault.interop.progress.ByteProgress`) is told the bytes of array data, then
    each slab's as it is written. Example::

        report = export_safetensors("ckpt/step_1000", "model.safetensors", only="model")
        weights = safetensors.torch.load_file("model.safetensors")  # {"0.weight": ..., ...}
    """
    destination = _local_target(target, overwrite, "safetensors")
    checkpoint = open_checkpoint(path, storage_options)
    items, report = _plan(checkpoint, only, dtype, destination, "safetensors")
    meter = _started(progress, report.bytes)
    with RegionReader(checkpoint.reader, verify=True) as regions:
        write_file(destination, items, regions, _file_metadata(checkpoint), buffer_bytes, meter)
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
    progress: ByteProgress | None = None,
) -> ExportReport:
    """Write the arrays as an HF-style directory ``target``: ``model-00001-of-0000N.safetensors``
    files of at most ``max_shard_bytes`` of data each (an array larger than that gets a file of
    its own) and ``model.safetensors.index.json`` (``{"metadata": {"total_size": n},
    "weight_map": {name: file}}``), which ``transformers``' ``from_pretrained`` reads.

    Names are key paths relative to ``only`` with dots between their parts
    (``layers.0.weight``). Without ``only`` the checkpoint must hold one model: arrays at the
    root, or under a single top-level key (exported as if ``only`` named it; ``report.only``
    says which); several are refused. The directory is written under a temporary name and
    renamed into place; ``overwrite`` replaces only an earlier HF export. Example::

        export_hf("ckpt/step_1000", "hf-model", only="model", max_shard_bytes=2 * 10**9)
    """
    if max_shard_bytes <= 0:
        raise CheckpointError(f"the maximum shard size must be positive, got {max_shard_bytes}")
    destination = _local_target(target, overwrite, "hf")
    checkpoint = open_checkpoint(path, storage_options)
    items, report = _plan(checkpoint, only, dtype, destination, "hf")
    meter = _started(progress, report.bytes)
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
                    meter,
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
    node = checkpoint.manifest.tree
    if only is not None:
        try:
            node = tree_paths.subtree(node, only, checkpoint.directory)
        except KeyError as exc:
            raise CheckpointError(str(exc.args[0])) from None
    leaves = collect(node, checkpoint.directory)
    arrays = leaves.arrays
    if kind == "hf" and only is None:
        only, arrays = _one_model(arrays, checkpoint.directory)
    items: list[Item] = []
    seen: set[str] = set()
    for leaf in arrays:
        name = _name(leaf, only, kind)
        if name in seen or name == "__metadata__":
            raise UnsupportedValueError(
                _full_path(only, leaf.name) or "(root)",
                f"two arrays would both be named {name!r} in the export (key paths are not "
                "unique, or the name is safetensors' reserved __metadata__); export a subtree "
                "with only= or rename the key",
            )
        seen.add(name)
        logical = _logical(checkpoint, leaf.kind, leaf.id)
        out_dtype = casting.output_dtype(logical.entry.dtype, dtype)
        if dtypes.lookup(out_dtype).safetensors is None:
            raise UnsupportedValueError(
                _full_path(only, leaf.name),
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
        only=only,
    )
    return items, report


def _name(leaf: Leaf, only: str | None, kind: str) -> str:
    """The array's name in the file: its key path (``/``), or HF's dotted form (``.``); an
    array exported on its own (``only`` names it) takes the last part of ``only``."""
    if not leaf.parts:
        return (only or "").strip("/").rsplit("/", 1)[-1] or "tensor"
    return ".".join(leaf.parts) if kind == "hf" else leaf.name


def _one_model(arrays: list[Leaf], where: str) -> tuple[str | None, list[Leaf]]:
    """The model an HF export without ``only`` writes: every array when they all sit at the
    root, or the one top-level key they all sit under (names then relative to it)."""
    tops = list(dict.fromkeys(leaf.parts[0] for leaf in arrays if leaf.parts))
    nested = {leaf.parts[0] for leaf in arrays if len(leaf.parts) > 1}
    if not nested:
        return None, arrays  # a flat state dict (or a single array)
    if len(tops) == 1:
        top = tops[0]
        return top, [Leaf(leaf.parts[1:], leaf.kind, leaf.id) for leaf in arrays]
    pick = "model" if "model" in nested else next(t for t in tops if t in nested)
    shown = ", ".join(tops[:8]) + (f", ... ({len(tops)} in all)" if len(tops) > 8 else "")
    raise CheckpointError(
        f"{where} holds arrays under several top-level keys ({shown}), and an HF model "
        f"directory holds one model: export one of them with only='{pick}' (--only {pick}), "
        "or write them all, named by key path, with the safetensors format"
    )


def _logical(checkpoint: OpenCheckpoint, kind: str, index: int) -> Logical:
    manifest = checkpoint.manifest
    rows = manifest.sharded if kind == "sharded" else manifest.tensors
    if not 0 <= index < len(rows):
        raise CheckpointError(f"{checkpoint.directory}: the tree refers to {kind} {index}")
    if kind == "sharded":
        return sharded_logical(manifest, index)
    return plain_logical(manifest, index)


def _full_path(only: str | None, name: str) -> str:
    return "/".join(part for part in ((only or "").strip("/"), name) if part)


def _started(progress: ByteProgress | None, total: int) -> ByteProgress:
    progress = progress or NoProgress()
    progress.start(total)
    return progress


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


def _local_target(target: str | os.PathLike[str], overwrite: bool, kind: str) -> str:
    text = os.fspath(target)
    local = local_directory(text)
    if local is None:
        raise CheckpointError(
            f"export writes to a local path, not {text.split('://', 1)[0]}:// (export to a "
            "local disk, then upload)"
        )
    destination = os.path.abspath(local)
    if kind == "safetensors" and os.path.isdir(destination):
        raise CheckpointExistsError(
            f"{destination} is a directory: the safetensors format writes one file, and an "
            "export never replaces a directory. Give a file path (such as "
            f"{os.path.join(destination, 'model.safetensors')}), or --format hf (format='hf') "
            "for an HF-style directory"
        )
    if os.path.lexists(destination) and not overwrite:
        raise CheckpointExistsError(
            f"{destination} already exists; choose another path or pass overwrite=True "
            "(--overwrite)"
        )
    if kind == "hf" and os.path.isdir(destination):
        _refuse_foreign_directory(destination)
    parent = os.path.dirname(destination)
    if not os.path.isdir(parent):
        raise CheckpointError(f"cannot export to {destination}: {parent} is not a directory")
    return destination


def _refuse_foreign_directory(destination: str) -> None:
    """An overwrite replaces the whole directory: refuse one holding anything an HF export did
    not write (a config, a tokenizer, someone's files), so that nothing else is deleted."""
    try:
        names = sorted(os.listdir(destination))
    except OSError as exc:
        raise CheckpointError(f"cannot export to {destination}: {exc.strerror or exc}") from None
    foreign = [n for n in names if n != INDEX_NAME and not _HF_FILE.match(n)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise CheckpointExistsError(
            f"{destination} is a directory that holds more than an earlier HF export ({shown}); "
            "an overwrite would delete all of it, so the export refuses: choose another path, "
            "or move those files away first"
        )


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
