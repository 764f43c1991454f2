"""Reuse: an incremental save writes only what changed, and shares the rest with the previous
checkpoint of the run, file by file, so that every checkpoint stays whole.

A shard file of the previous checkpoint (the *baseline*) is shared when the new save would write
it byte for byte again: the same tensors, in the same order, under the same names, with the same
dtypes, shapes and bytes, and the same header. Shared means hard-linked on a local disk (both
directories then list the same blocks: deleting either leaves the other whole, and ``cp -r`` of
one copies it), copied server-side on an object store. Equal bytes are decided by the content
hashes (format.checksum.content_hash, 128 bits) the baseline's save recorded, or, for a file
without them, by equal CRC32Cs (block by block: a changed tensor is told apart after its first
changed block) and then by reading the baseline file back and comparing (32 bits decide
nothing; local disks only).

Which tensors go into which file decides what can be shared, so the layout keeps the tensors
that do not change apart from those that do:

- *stable* tensors: those the last save found unchanged, and on a first save the frozen
  parameters (``requires_grad=False``): they go into the baseline's own files again where the
  baseline has a file of exactly those tensors (so that it can be shared), the rest into new
  stable files, sorted by key path. Stable files record content hashes (``Layout.hashed``),
  so that sharing them next time reads nothing back;
- *volatile* tensors (everything else): laid out as a full save lays them out, without
  content hashes: a dense state, where everything changes, pays no hashing at all.

A stable file whose tensors did change is written, not shared; a volatile tensor that did not
change is written once more (unless its whole file did not change), then found unchanged
(:func:`unchanged`) and laid out as stable from the next save on. Example::

    baseline = Baseline.of(previous_location, previous_manifest, rank=0)
    layout = plan_layout(plan, leaves, baseline, max_file_bytes=None)
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from statevault.engine.layout import group_files
from statevault.engine.plan import Leaf, SavePlan
from statevault.format.checksum import content_hash, crc32c_of, format_checksum
from statevault.format.manifest import BLOCK_BYTES, FileEntry, Manifest, TensorEntry
from statevault.storage.local import open_read, read_into_fd
from statevault.storage.location import Location

COMPARE_BYTES = 4 << 20  # the baseline file is read back in pieces of this size


@dataclass(frozen=True)
class Baseline:
    """The previous committed checkpoint as one rank's save may reuse it: its location, its
    files holding content hashes (this rank's own, by their names) and the key paths it found
    unchanged (``stable``: laid out apart from the others by the next save)."""

    location: Location
    files: dict[str, FileEntry]
    rows: dict[str, list[TensorEntry]]  # file name -> its tensor rows, in offset order
    stable: frozenset[str] = frozenset()

    @classmethod
    def of(cls, location: Location, manifest: Manifest, rank: int) -> Baseline:
        """The baseline ``manifest`` gives a save of ``rank`` (after a restart: the files of
        that rank, by their names; stable, the tensors of the files its save recorded as
        unchanged: ``info.save.stable_files``)."""
        rows: dict[str, list[TensorEntry]] = {}
        for entry in manifest.tensors:
            rows.setdefault(entry.file, []).append(entry)
        prefix = f"data-r{rank:05d}-"
        files = {f.name: f for f in manifest.files if f.name.startswith(prefix)}
        kept = {name: sorted(rows.get(name, []), key=lambda r: r.offset) for name in files}
        recorded = manifest.info.get("save", {}).get("stable_files", [])
        names = set(recorded) & set(files) if isinstance(recorded, list) else set()
        stable = frozenset(row.path for name in names for row in kept[name])
        return cls(location, files, kept, stable)

    def by_path(self) -> dict[str, TensorEntry]:
        """This rank's rows by key path."""
        return {row.path: row for rows in self.rows.values() for row in rows}


def unchanged(row: TensorEntry, before: TensorEntry | None) -> bool:
    """Whether a tensor written (or shared) by a save equals the baseline's at its path, as a
    layout hint: by content hash where both rows have one, else by CRC32C, dtype and shape."""
    if before is None:
        return False
    if row.hash is not None and before.hash is not None:
        return row.hash == before.hash
    same_kind = (row.dtype, row.shape, row.nbytes) == (before.dtype, before.shape, before.nbytes)
    return same_kind and row.checksum == before.checksum


@dataclass
class Layout:
    """The shard files of a save (leaf indices per file, written in that order) and, for the
    files that may be shared, the baseline file each one would repeat."""

    files: list[list[int]]
    candidates: dict[int, str] = field(default_factory=dict)  # file index -> baseline file
    hashed: set[int] = field(default_factory=set)  # the stable files: their rows get hashes


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
    layout.hashed = set(range(len(layout.files)))
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
    header: Callable[[], bytes],
) -> list[TensorEntry] | None:
    """The baseline rows of file ``name`` when the planned file (``leaves`` with their staged
    bytes, and the ``header()`` it would have) would repeat it byte for byte; None when anything
    differs. The tensors are compared first: a changed one usually ends it at its first block,
    before the header of a file of many tensors is even encoded."""
    entry = baseline.files[name]
    rows = baseline.rows[name]
    for leaf, row in zip(leaves, rows, strict=True):  # the first that differs ends it
        if row.hash is None and not _same_crc(staged[leaf], row):
            return None
    for leaf, row in zip(leaves, rows, strict=True):
        if row.hash is not None and content_hash(staged[leaf]) != row.hash:
            return None
    encoded = header()
    if len(encoded) != entry.header_size:
        return None
    if format_checksum(crc32c_of(encoded)) != entry.header_checksum:
        return None
    if not _still_there(baseline.location, entry):
        return None
    if all(row.hash is not None for row in rows):
        return rows
    # A volatile file that did not change: equal CRC32Cs, then equal bytes, since 32 bits do
    # not decide equality (on a local disk only, where reading it back costs little).
    if baseline.location.local and _same_bytes(baseline, entry, leaves, rows, staged):
        return rows
    return None


def _same_crc(data: memoryview, row: TensorEntry) -> bool:
    """``data`` has the CRC32C of ``row``, compared block by block (``row.blocks``) so that a
    changed tensor is told apart after its first changed block."""
    if len(data) != row.nbytes:
        return False
    expected = [*row.blocks, row.checksum]
    if len(expected) != max(1, -(-len(data) // BLOCK_BYTES)):
        return format_checksum(crc32c_of(data)) == row.checksum
    value = 0
    for index, start in enumerate(range(0, max(len(data), 1), BLOCK_BYTES)):
        value = crc32c_of(data[start : start + BLOCK_BYTES], value)
        if format_checksum(value) != expected[index]:
            return False
    return True


def _same_bytes(
    baseline: Baseline,
    entry: FileEntry,
    leaves: Sequence[int],
    rows: Sequence[TensorEntry],
    staged: Mapping[int, memoryview],
) -> bool:
    """The baseline file holds exactly the staged bytes of ``leaves`` at its rows' offsets."""
    buffer = memoryview(bytearray(COMPARE_BYTES))
    try:
        fd = open_read(baseline.location.join(entry.name).path)
    except OSError:
        return False
    try:
        for leaf, row in zip(leaves, rows, strict=True):
            data = staged[leaf]
            for start in range(0, len(data), COMPARE_BYTES):
                piece = data[start : start + COMPARE_BYTES]
                read = buffer[: len(piece)]
                read_into_fd(fd, row.offset + start, read)
                if read != piece.cast("B"):
                    return False
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


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
