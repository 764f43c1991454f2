"""Verify: open -> check files and headers -> checksum every tensor -> decode the tree, and report
every problem found (what ``load`` would refuse included), without loading anything. Example::

    report = verify("ckpt/epoch10")
    if not report.ok:
        print("\\n".join(report.problems))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from statevault.adapters import known_frameworks
from statevault.checkpoint.open import READ_ATTEMPTS, OpenCheckpoint, PathLike, open_checkpoint
from statevault.checkpoint.read import WHOLE_TREE, decode
from statevault.engine.progress import ByteProgress
from statevault.engine.reader import CheckpointReader, ReadOutcome
from statevault.errors import CheckpointError, CorruptCheckpointError
from statevault.format import dtypes, tree_paths
from statevault.format import tree as tree_codec
from statevault.format.manifest import Manifest, TensorEntry
from statevault.storage.location import resolve

# verify checks tensors in batches of about this many bytes: its memory stays bounded (each
# batch's scratch buffers go before the next is read, where one read of everything held the
# whole checkpoint) and a progress bar moves as it goes. Large enough that a batch keeps every
# read thread busy.
VERIFY_BATCH_BYTES = 1 << 30


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` is True when ``problems`` is empty."""

    path: str
    problems: list[str] = field(default_factory=list)
    files: int = 0
    tensors: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    path: PathLike,
    *,
    only: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: ByteProgress | None = None,
) -> VerifyReport:
    """Check every byte of a checkpoint against its manifest without loading it. ``only``: a
    key path; check just that subtree's tensors and their files, reading nothing else.
    ``progress`` is told the bytes to checksum, then each batch's as it is checked.

    Example::

        report = sv.verify("ckpt/epoch10")
        if not report.ok:
            print("\\n".join(report.problems))
    """
    location = resolve(path, storage_options)
    for attempt in range(1, READ_ATTEMPTS + 1):
        report = VerifyReport(location.url)
        try:
            checkpoint = open_checkpoint(location)
        except CorruptCheckpointError as exc:
            report.problems.extend(exc.problems)
            return report
        with checkpoint:
            _verify_open(checkpoint, only, report, progress)
            if report.ok or attempt == READ_ATTEMPTS or checkpoint.still_current():
                return report
            # replaced or deleted while it was read: check the one now at the path
    raise AssertionError("unreachable")


def _verify_open(
    checkpoint: OpenCheckpoint,
    only: str | None,
    report: VerifyReport,
    progress: ByteProgress | None,
) -> VerifyReport:
    if only is not None:
        return _verify_subtree(checkpoint, only, report, progress)
    manifest = checkpoint.manifest
    report.files, report.tensors = len(manifest.files), len(manifest.tensors)
    report.problems.extend(checkpoint.reader.file_problems(check_headers=True))
    report.problems.extend(_tree_problems(checkpoint))
    report.problems.extend(_loadability_problems(manifest))
    if not report.problems:
        outcome = _checksum(checkpoint.reader, range(len(manifest.tensors)), progress)
        report.problems.extend(outcome.problems)
        report.bytes_checked = outcome.bytes_read
    return report


def _checksum(
    reader: CheckpointReader, ids: Sequence[int], progress: ByteProgress | None
) -> ReadOutcome:
    """Read and checksum the tensors ``ids``, batch by batch (see VERIFY_BATCH_BYTES)."""
    entries = reader.manifest.tensors
    if progress is not None:
        progress.start(sum(entries[i].nbytes for i in ids))
    outcome = ReadOutcome()
    for batch in _batches(ids, entries, VERIFY_BATCH_BYTES):
        part = reader.read(batch, _scratch, verify=True)
        # a shard that cannot be opened is reported by every batch that reads it: once is enough
        outcome.problems.extend(p for p in part.problems if p not in outcome.problems)
        outcome.bytes_read += part.bytes_read
        if progress is not None and part.bytes_read:
            progress.advance(part.bytes_read)
    return outcome


def _batches(ids: Sequence[int], entries: Sequence[TensorEntry], limit: int) -> Iterator[list[int]]:
    """``ids`` in order, cut into runs of at most ``limit`` bytes (a larger tensor alone)."""
    batch: list[int] = []
    size = 0
    for index in ids:
        if batch and size + entries[index].nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(index)
        size += entries[index].nbytes
    if batch:
        yield batch


def _verify_subtree(
    checkpoint: OpenCheckpoint, key: str, report: VerifyReport, progress: ByteProgress | None
) -> VerifyReport:
    """The files holding the subtree's tensors (sizes, headers) and those tensors' checksums;
    a sharded tensor's chunks are its tensors."""
    manifest = checkpoint.manifest
    try:
        node = tree_paths.subtree(manifest.tree, key, checkpoint.directory)
    except KeyError as exc:
        raise CheckpointError(str(exc.args[0])) from None
    ids = set(tree_paths.tensor_ids(node))
    for index in tree_paths.tensor_ids(node, tag="sharded"):
        if 0 <= index < len(manifest.sharded):
            ids |= {chunk.tensor for chunk in manifest.sharded[index].chunks}
        else:
            report.problems.append(f"subtree {key} refers to sharded tensor {index}")
    bad = sorted(i for i in ids if not 0 <= i < len(manifest.tensors))
    if bad:
        report.problems.append(f"subtree {key} refers to tensor {bad[0]}, which does not exist")
    if report.problems:
        return report
    names = {manifest.tensors[i].file for i in ids}
    subset = replace(manifest, files=[f for f in manifest.files if f.name in names])
    reader = CheckpointReader(checkpoint.location, subset, checkpoint.dir_fd)
    report.files, report.tensors = len(subset.files), len(ids)
    report.problems.extend(reader.file_problems(check_headers=True))
    if not report.problems:
        outcome = _checksum(reader, sorted(ids), progress)
        report.problems.extend(outcome.problems)
        report.bytes_checked = outcome.bytes_read
    return report


def _scratch(entry: TensorEntry) -> tuple[object, memoryview]:
    buffer = bytearray(entry.nbytes)
    return buffer, memoryview(buffer)


def _tree_problems(checkpoint: OpenCheckpoint) -> list[str]:
    count = len(checkpoint.manifest.tensors)
    stand_ins = {i: object() for i in range(len(checkpoint.manifest.sharded))}
    try:
        decode(checkpoint, {i: object() for i in range(count)}, WHOLE_TREE, stand_ins)
        tree_codec.decode(
            checkpoint.manifest.metadata, _no_tensor_in_metadata, checkpoint.directory
        )
    except CorruptCheckpointError as exc:
        return list(exc.problems)
    return []


def _no_tensor_in_metadata(index: int) -> Any:
    raise CorruptCheckpointError(f"metadata refers to tensor {index}: metadata holds no arrays")


def _loadability_problems(manifest: Manifest) -> list[str]:
    """What load would refuse although the bytes are intact: an unknown array kind, or a
    dtype the array kind cannot hold (numpy has no bfloat16)."""
    problems = []
    for entry in manifest.tensors:
        if entry.framework not in known_frameworks():
            problems.append(f"tensor {entry.path}: unknown array kind {entry.framework[:40]!r}")
        elif entry.framework == "numpy" and dtypes.lookup(entry.dtype).numpy is None:
            problems.append(f"tensor {entry.path}: numpy has no dtype {entry.dtype}")
    return problems
