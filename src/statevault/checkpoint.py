"""One checkpoint: save, load and verify. The public entry points read as their steps.

save:   check target -> prepare (plan) -> stage -> write shards -> manifest -> commit
load:   open (manifest, validated) -> check files -> read + verify -> decode -> restore into
verify: open -> check files and headers -> checksum every tensor -> decode the tree
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from statevault import commit
from statevault.adapters import adapter_named, known_frameworks
from statevault.distributed.group import rank_and_world, rank_picker
from statevault.distributed.saver import new_saver
from statevault.engine.progress import ByteProgress
from statevault.engine.reader import CheckpointReader, ReadOutcome
from statevault.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
)
from statevault.format import dtypes
from statevault.format import tree as tree_codec
from statevault.format.checksum import crc32c_of
from statevault.format.manifest import MAX_MANIFEST_BYTES, Manifest, TensorEntry, parse_manifest
from statevault.format.names import MANIFEST_NAME
from statevault.loading import read_tensors
from statevault.restore import LoadedState, restore_into
from statevault.storage.local import open_read, read_into_fd
from statevault.storage.location import Location, local_directory, resolve

PathLike = str | os.PathLike[str]
_WHOLE_TREE = object()
# verify checks tensors in batches of about this many bytes: its memory stays bounded (each
# batch's scratch buffers go before the next is read, where one read of everything held the
# whole checkpoint) and a progress bar moves as it goes. Large enough that a batch keeps every
# read thread busy.
VERIFY_BATCH_BYTES = 1 << 30


def save(
    state: Any,
    path: PathLike,
    *,
    metadata: Any = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    collective: bool = True,
) -> Manifest:
    """Save ``state`` as a committed checkpoint at ``path`` (a path or any fsspec URL).

    Returns its manifest. ``storage_options`` go to fsspec (endpoint, credentials). Inside a
    ``torch.distributed`` job every rank calls ``save`` and each writes its share
    (docs/distributed.md); ``collective=False`` saves from this process alone (say, only on
    rank 0, with full tensors), no other rank taking part. Example::

        sv.save({"epoch": 10, "model": model, "optimizer": opt, "loss": 0.02}, "ckpt/epoch10")
    """
    target = resolve(path, storage_options)
    return save_checkpoint(
        state, target, metadata=metadata, overwrite=overwrite, collective=collective
    )


def save_checkpoint(
    state: Any,
    directory: str | Location,
    *,
    metadata: Any = None,
    overwrite: bool = False,
    extra_info: Mapping[str, Any] | None = None,
    collective: bool = True,
) -> Manifest:
    """:func:`save` for callers that add manifest info (the manager: run id, step, metrics)."""
    saver = new_saver(asynchronous=False, collective=collective)
    future = saver.save(
        state, directory, metadata=metadata, overwrite=overwrite, extra_info=extra_info
    )
    return future.result()


@dataclass
class OpenCheckpoint:
    """A checkpoint whose manifest has been read and validated (no payload read yet).

    On a local disk the checkpoint's directory is opened once (``dir_fd``) and every file is
    read through that descriptor (``openat``): a concurrent ``save(overwrite=True)``, which
    swaps the directory at the path, can never mix the old manifest with the new shards. Close
    it (or use ``with``) when done; an unclosed one closes its descriptor when collected.
    """

    location: Location
    manifest: Manifest
    dir_fd: int | None = None
    manifest_checksum: int = 0  # of the manifest's bytes, to tell whether it was replaced

    @property
    def directory(self) -> str:
        """The checkpoint's path or URL, as messages show it."""
        return self.location.url

    @property
    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.location, self.manifest, self.dir_fd)

    def still_current(self) -> bool:
        """Whether this is still the checkpoint at its path: False once it was replaced or
        deleted while it was being read (its manifest is gone from the directory opened, or
        the object store holds another manifest there now)."""
        if self.dir_fd is not None:
            try:
                os.stat(MANIFEST_NAME, dir_fd=self.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            return True
        if self.location.local:
            return True
        try:
            data = _remote_manifest_bytes(self.location)
        except CheckpointError:
            return False
        return crc32c_of(data) == self.manifest_checksum

    def close(self) -> None:
        fd, self.dir_fd = self.dir_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> OpenCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()  # closing a descriptor: no I/O to wait for


def open_checkpoint(
    path: PathLike | Location, storage_options: Mapping[str, Any] | None = None
) -> OpenCheckpoint:
    """The checkpoint at ``path`` with its manifest parsed and validated (no payload read)."""
    location = resolve(path, storage_options)
    if commit.is_temporary(location.name):
        # A save in flight (or dead, or the old side of an overwrite): never a checkpoint,
        # even once its manifest is written, until it is renamed to its final name.
        raise CheckpointNotFoundError(f"{location.url} is an unfinished save, not a checkpoint")
    if not location.local:
        data = _remote_manifest_bytes(location)
        manifest = parse_manifest(data, location.url)
        return OpenCheckpoint(location, manifest, None, crc32c_of(data))
    for attempt in range(1, READ_ATTEMPTS + 1):
        dir_fd = _open_directory(location.path)
        try:
            data = _local_manifest_bytes(dir_fd, location.path)
            manifest = parse_manifest(data, location.path)
        except CheckpointNotFoundError:
            replaced = _replaced(dir_fd, location.path)
            os.close(dir_fd)
            if attempt == READ_ATTEMPTS or not replaced:
                raise
            continue  # the directory opened was swapped out and is being deleted: try again
        except BaseException:
            os.close(dir_fd)
            raise
        return OpenCheckpoint(location, manifest, dir_fd, crc32c_of(data))
    raise AssertionError("unreachable")


def _replaced(dir_fd: int, path: str) -> bool:
    """Whether ``path`` names another directory now than the one open as ``dir_fd``."""
    opened = os.fstat(dir_fd)
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino)


def _open_directory(directory: str) -> int:
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointNotFoundError(f"no committed checkpoint at {directory}") from None
    except OSError as exc:  # EACCES, ESTALE: there may well be a checkpoint; say so, never "none"
        raise CheckpointError(
            f"{directory}: cannot open the directory ({exc.strerror or exc}); check the "
            "permissions and the mount"
        ) from exc


def _local_manifest_bytes(dir_fd: int, directory: str) -> bytes:
    """manifest.json read through the directory's descriptor, as a plain file only."""
    try:
        mode = os.stat(MANIFEST_NAME, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no committed checkpoint at {directory}") from None
    except OSError as exc:  # EACCES, ESTALE: there may well be a checkpoint; say so, never "none"
        raise CheckpointError(
            f"{directory}: cannot look for manifest.json ({exc.strerror or exc}); check the "
            "permissions and the mount"
        ) from exc
    if not stat.S_ISREG(mode):  # a symlink, directory, FIFO...
        raise CorruptCheckpointError(
            f"{directory}: manifest.json is not a regular file (a symlink, directory or "
            "device); statevault reads only plain files inside the checkpoint"
        )
    try:
        fd = open_read(MANIFEST_NAME, dir_fd=dir_fd)
    except OSError as exc:
        raise CorruptCheckpointError(f"{directory}: cannot open manifest.json ({exc})") from None
    try:
        size = os.fstat(fd).st_size
        if size > MAX_MANIFEST_BYTES:  # refuse before allocating
            raise CorruptCheckpointError(
                f"{directory}: manifest.json is implausibly large ({size} B)"
            )
        data = bytearray(size)
        read_into_fd(fd, 0, memoryview(data))
    except (OSError, EOFError) as exc:
        raise CorruptCheckpointError(f"{directory}: cannot read manifest.json ({exc})") from None
    finally:
        os.close(fd)
    return bytes(data)


def _remote_manifest_bytes(location: Location) -> bytes:
    manifest = location.join(MANIFEST_NAME)
    try:
        size = location.storage.size(manifest.path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no committed checkpoint at {location.url}") from None
    if size > MAX_MANIFEST_BYTES:  # refuse before allocating
        raise CorruptCheckpointError(f"{location.url}: manifest.json is implausibly large")
    try:
        return location.storage.read_bytes(manifest.path, 0, size)
    except FileNotFoundError:  # deleted since it was sized: a retention or an overwrite
        raise CheckpointNotFoundError(f"no committed checkpoint at {location.url}") from None
    except EOFError as exc:
        raise CorruptCheckpointError(f"{location.url}: cannot read manifest.json ({exc})") from None


# A load or verify that finds its checkpoint replaced or deleted under it (an overwrite, a
# retention) reads the one now at the path, at most this many times in all.
READ_ATTEMPTS = 3


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
        with open_checkpoint(path, storage_options) as checkpoint:
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
    node = checkpoint.manifest.tree
    if only is not None:
        try:
            node = tree_codec.subtree(node, only, checkpoint.directory, rank_and_world()[0])
        except KeyError as exc:
            raise CheckpointError(str(exc.args[0])) from None
    tensors = read_tensors(
        checkpoint,
        node,
        into,
        device,
        verify,
        pick_rank,
        lambda ids: _read_arrays(checkpoint, verify, device, ids, all_files=only is None),
    )
    return _decode(checkpoint, tensors.plain, node, tensors.sharded, pick_rank)


def _read_arrays(
    checkpoint: OpenCheckpoint,
    verify: bool,
    device: str | None,
    ids: list[int] | None = None,
    all_files: bool = False,
) -> dict[int, Any]:
    """The arrays ``ids`` (default: all), verified; a partial load checks only their files
    unless ``all_files`` (a whole load checks every file it may touch)."""
    reader = checkpoint.reader
    where = checkpoint.directory
    entries = checkpoint.manifest.tensors
    wanted = [i for i in ids if 0 <= i < len(entries)] if ids is not None else range(len(entries))
    files = {entries[i].file for i in wanted}
    problems = reader.file_problems(verify, None if ids is None or all_files else files)
    if problems:
        raise CorruptCheckpointError(f"{where} is damaged: {problems[0]}", problems)
    for entry in (entries[i] for i in wanted):  # unknown frameworks fail before any read
        try:
            adapter_named(entry.framework)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: tensor {entry.path}: {exc}") from None
    if checkpoint.location.local:  # view the page cache in place: no allocation, no copy
        outcome = reader.map(wanted, _adopter(where), verify)
    else:
        outcome = reader.read(wanted, _allocator(where), verify)
    if outcome.problems:
        detail = outcome.problems[0] + (
            f" (and {len(outcome.problems) - 1} more)" if len(outcome.problems) > 1 else ""
        )
        raise CorruptCheckpointError(f"{where} is damaged: {detail}", outcome.problems)
    return {
        i: adapter_named(entries[i].framework).finalize(outcome.arrays[i], entries[i], device)
        for i in wanted
    }


def _adopter(where: str) -> Any:
    def adopt(entry: TensorEntry, view: memoryview) -> object:
        try:
            return adapter_named(entry.framework).from_buffer(view, entry)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise CorruptCheckpointError(f"{where}: tensor {entry.path}: {exc}") from None

    return adopt


def _allocator(where: str) -> Any:
    def allocate(entry: TensorEntry) -> tuple[object, memoryview]:
        adapter = adapter_named(entry.framework)
        try:
            array = adapter.allocate(entry)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise CorruptCheckpointError(f"{where}: tensor {entry.path}: {exc}") from None
        return array, adapter.writable_bytes(array)

    return allocate


def _decode(
    checkpoint: OpenCheckpoint,
    arrays: Mapping[int, Any],
    node: Any = _WHOLE_TREE,
    sharded: Mapping[int, Any] | None = None,
    pick_rank: Any = None,
) -> Any:
    """Decode ``node`` (default: the whole tree), its tensors taken from ``arrays`` and
    ``sharded``; ``pick_rank`` chooses per-rank branches (default: check all, give rank 0's)."""

    def resolver(values: Mapping[int, Any], kind: str) -> Any:
        def resolve(index: int) -> Any:
            if index not in values:
                raise CorruptCheckpointError(
                    f"{checkpoint.directory}: tree refers to {kind} {index}"
                )
            return values[index]

        return resolve

    tree = checkpoint.manifest.tree if node is _WHOLE_TREE else node
    return tree_codec.decode(
        tree,
        resolver(arrays, "tensor"),
        checkpoint.directory,
        resolve_sharded=resolver(sharded if sharded is not None else {}, "sharded tensor"),
        pick_rank=pick_rank,
        ranks=checkpoint.manifest.ranks,
    )


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
        node = tree_codec.subtree(manifest.tree, key, checkpoint.directory)
    except KeyError as exc:
        raise CheckpointError(str(exc.args[0])) from None
    ids = set(tree_codec.tensor_ids(node))
    for index in tree_codec.tensor_ids(node, tag="sharded"):
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
        _decode(checkpoint, {i: object() for i in range(count)}, _WHOLE_TREE, stand_ins)
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


def local_path(path: PathLike) -> str:
    """The local directory a path or ``file://`` URL names, for what works on local disks only
    (the manager, the run commands of the CLI); other URL schemes are refused."""
    directory = local_directory(path)
    if directory is None:
        scheme = os.fspath(path).split("://", 1)[0]
        raise CheckpointError(
            f"{scheme}:// is not supported here yet: run directories must be local paths "
            "(sv.save, sv.load and sv.verify accept URLs)"
        )
    return directory
