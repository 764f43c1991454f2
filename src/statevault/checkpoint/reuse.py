"""Reuse: an incremental save writes only what changed, and shares the rest with the previous
checkpoint of the run, file by file, so that every checkpoint stays whole.

A shard file of the previous checkpoint (the *baseline*) is shared when the new save would write
it byte for byte again: the same tensors, in the same order, under the same names, with the same
dtypes, shapes and content hashes (format.checksum.content_hash), and the same header. Shared
means hard-linked on a local disk (both directories then list the same blocks: deleting either
leaves the other whole, and ``cp -r`` of one copies it), copied server-side on an object store.
Nothing is ever read back or trusted but the baseline's own manifest, whose content hashes the
save that wrote it computed from the very bytes it wrote.

Which tensors go into which file decides what can be shared, so the layout keeps the tensors
that do not change apart from those that do:

- *stable* tensors: those the last save found unchanged, and on a first save the frozen
  parameters (``requires_grad=False``): they go into the baseline's own files again where the
  baseline has a file of exactly those tensors (so that it can be shared), the rest into new
  stable files, sorted by key path;
- *volatile* tensors (everything else): laid out as a full save lays them out.

A stable file whose tensors did change is written, not shared (its content hashes differ); a
volatile tensor that did not change is written once more, then found unchanged and laid out as
stable from the next save on. Example::

    baseline = Baseline.of(previous_location, previous_manifest, rank=0)
    layout = plan_layout(plan, leaves, baseline, max_file_bytes=None)
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from statevault.engine.layout import group_files
from statevault.engine.plan import Leaf, SavePlan
from statevault.format.checksum import content_hash, crc32c_of, format_checksum
from statevault.format.manifest import FileEntry, Manifest, TensorEntry
from statevault.storage.location import Location


@dataclass(frozen=True)
class Baseline:
    """The previous committed checkpoint as one rank's save may reuse it: its location, its
    files holding content hashes (this rank's own, by their names) and the key paths it found
    unchanged (``stable``: laid out apart from the others by the next save)."""

    location: Location
    files: dict[str, FileEntry]
    rows: dict[str, list[TensorEntry]]  # file name -> its tensor rows, in offset order
    stable: frozenset[str] = frozenset()
    hashes: dict[str, str] = field(default_factory=dict)  # key path -> content hash

    @classmethod
    def of(cls, location: Location, manifest: Manifest, rank: int) -> Baseline:
        """The baseline ``manifest`` gives a save of ``rank`` (after a restart: the files of
        that rank, by their names, whose every tensor row carries a content hash; stable, the
        tensors of the files its save recorded as unchanged: ``info.save.stable_files``)."""
        rows: dict[str, list[TensorEntry]] = {}
        for entry in manifest.tensors:
            rows.setdefault(entry.file, []).append(entry)
        prefix = f"data-r{rank:05d}-"
        files = {
            f.name: f
            for f in manifest.files
            if f.name.startswith(prefix) and all(r.hash for r in rows.get(f.name, []))
        }
        kept = {name: sorted(rows.get(name, []), key=lambda r: r.offset) for name in files}
        hashes = {e.path: e.hash for e in manifest.tensors if e.hash is not None}
        recorded = manifest.info.get("save", {}).get("stable_files", [])
        names = set(recorded) & set(files) if isinstance(recorded, list) else set()
        stable = frozenset(row.path for name in names for row in kept[name])
        return cls(location, files, kept, stable, hashes)


@dataclass
class Layout:
    """The shard files of a save (leaf indices per file, written in that order) and, for the
    files that may be shared, the baseline file each one would repeat."""

    files: list[list[int]]
    candidates: dict[int, str] = field(default_factory=dict)  # file index -> baseline file


def plan_layout(
    plan: SavePlan,
    leaves: Sequence[int],
    baseline: Baseline | None,
    max_file_bytes: int | None,
    incremental: bool = True,
) -> Layout:
    """The files of a save of ``leaves`` (see the module docstring)."""
    if not incremental:
        return Layout(group_files(plan, leaves, max_file_bytes))
    stable = [i for i in leaves if _stable(plan.leaves[i], baseline)]
    volatile = [i for i in leaves if i not in set(stable)]
    layout = Layout([])
    rest = set(stable)
    if baseline is not None:
        for name, files_leaves in _repeatable(plan, rest, baseline):
            layout.candidates[len(layout.files)] = name
            layout.files.append(files_leaves)
            rest -= set(files_leaves)
    by_path = sorted(rest, key=lambda i: plan.leaves[i].path)
    layout.files += group_files(plan, by_path, max_file_bytes) if by_path else []
    layout.files += group_files(plan, volatile, max_file_bytes) if volatile else []
    if baseline is not None:  # a file laid out as a baseline file was may repeat it
        same = _files_by_content(baseline)
        for index, members in enumerate(layout.files):
            match = same.get(tuple(_signature(plan, i) for i in members))
            if index not in layout.candidates and match is not None:
                layout.candidates[index] = match
    return layout


def _signature(plan: SavePlan, leaf: int) -> tuple[str, str, tuple[int, ...]]:
    spec = plan.leaves[leaf].spec
    return (plan.leaves[leaf].path, spec.dtype, spec.shape)


def _files_by_content(
    baseline: Baseline,
) -> dict[tuple[tuple[str, str, tuple[int, ...]], ...], str]:
    """The baseline files by the (path, dtype, shape) of their tensors, in order."""
    return {
        tuple((row.path, row.dtype, row.shape) for row in rows): name
        for name, rows in baseline.rows.items()
    }


def _stable(leaf: Leaf, baseline: Baseline | None) -> bool:
    """Unchanged at the last save, or a frozen parameter (the hint of a first save)."""
    if baseline is not None and leaf.path in baseline.stable:
        return True
    attrs = leaf.spec.attrs
    return leaf.frozen or (bool(attrs.get("parameter")) and not attrs.get("requires_grad"))


def _repeatable(
    plan: SavePlan, stable: set[int], baseline: Baseline
) -> list[tuple[str, list[int]]]:
    """The baseline files made of stable leaves only (same paths, dtypes, shapes), with those
    leaves in the file's own order."""
    by_path = {plan.leaves[i].path: i for i in stable}
    found: list[tuple[str, list[int]]] = []
    for name in sorted(baseline.rows):
        rows = baseline.rows[name]
        members = [by_path.get(row.path) for row in rows]
        if not rows or any(m is None for m in members):
            continue
        leaves = [m for m in members if m is not None]
        same = all(
            plan.leaves[i].spec.dtype == row.dtype and plan.leaves[i].spec.shape == row.shape
            for i, row in zip(leaves, rows, strict=True)
        )
        if same and len(set(leaves)) == len(leaves):
            found.append((name, leaves))
            for i in leaves:
                del by_path[plan.leaves[i].path]
    return found


def shareable_rows(
    baseline: Baseline,
    name: str,
    leaves: Sequence[int],
    staged: Mapping[int, memoryview],
    header: bytes,
) -> list[TensorEntry] | None:
    """The baseline rows of file ``name`` when the planned file (``leaves`` with their staged
    bytes, and ``header``) would repeat it byte for byte; None when anything differs."""
    entry = baseline.files[name]
    rows = baseline.rows[name]
    if format_checksum(crc32c_of(header)) != entry.header_checksum:
        return None
    if len(header) != entry.header_size:
        return None
    for leaf, row in zip(leaves, rows, strict=True):  # the first that differs ends it
        if content_hash(staged[leaf]) != row.hash:
            return None
    return rows if _still_there(baseline.location, entry) else None


def _still_there(location: Location, entry: FileEntry) -> bool:
    """The baseline file is a regular file of the recorded size (a local check; a store's copy
    fails on its own when the object is gone)."""
    if not location.local:
        return True
    try:
        info = os.lstat(location.join(entry.name).path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == entry.size
