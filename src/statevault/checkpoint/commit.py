"""The commit protocol, and the one test of whether a checkpoint exists.

A checkpoint exists if and only if ``<dir>/manifest.json`` exists (and parses: checked by the
reader). On a local disk a save writes everything under ``<name>.tmp-<id>``, fsyncs every file and
the directory, then renames it to ``<name>`` and fsyncs the parent. Replacing a committed
checkpoint swaps the two directories with one atomic ``renameat2(RENAME_EXCHANGE)`` so that no
instant exists without a committed checkpoint at ``<name>``; the old one, now under the temporary
name, is deleted manifest first. Temporaries are never listed or loaded; the manager sweeps them.

On object stores (no rename) the manifest is the last object written: :class:`ObjectCommit`.
One rule, two protocols.

Ownership: the first file a save writes, before any shard, is its marker (``.statevault-save``;
``.statevault-save-<tag>`` on object stores), and it stays in the committed checkpoint. A
deletion removes the manifest first and the marker last. So a directory or prefix is
statevault's own (:func:`ownership`) when it holds a statevault manifest or a marker, whatever
state a crash left it in; statevault deletes nothing else (manager/leftovers.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import socket
import time
import uuid
from typing import Literal

from statevault._version import __version__
from statevault.errors import CheckpointError, CheckpointExistsError
from statevault.format.manifest import ENVELOPE_PREFIX
from statevault.format.names import MANIFEST_NAME, is_marker_name, is_shard_name, marker_name
from statevault.storage.local import LocalStorage, fsync_dir
from statevault.storage.location import Location

TMP_MARKER = ".tmp-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_MARKER_LIMIT = 4096
Ownership = Literal["ours", "foreign", "empty", "absent", "unknown"]


def marker_bytes() -> bytes:
    """The marker's content: who wrote the save (for a person reading it; ownership needs only
    ``"writer": "statevault"``)."""
    record = {
        "writer": "statevault",
        "version": __version__,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "created_unix": time.time(),
    }
    return json.dumps(record).encode()


def write_marker(directory: Location, tag: str = "") -> None:
    """Write the save's marker into ``directory`` (durably: before any shard)."""
    path = directory.join(marker_name(tag)).path
    with directory.storage.open_write(path) as handle:
        handle.write(memoryview(marker_bytes()))


def ownership(directory: Location) -> Ownership:
    """Whether statevault wrote ``directory``: "ours" (a statevault manifest or a marker),
    "empty", "absent", "foreign" (something else), or "unknown" when it cannot be read
    (EACCES, ESTALE, a dropped connection): a caller deciding on a deletion keeps it then."""
    storage = directory.storage
    try:
        if directory.local and not storage.is_dir(directory.path):
            return "absent" if not storage.exists(directory.path) else "foreign"
        names = storage.list_dir(directory.path)
        if not names:  # an object store has no empty prefixes
            return "empty" if directory.local else "absent"
        if MANIFEST_NAME in names and _starts_with(directory, MANIFEST_NAME, ENVELOPE_PREFIX):
            return "ours"
        if any(is_marker_name(n) and _is_marker(directory, n) for n in names):
            return "ours"
        if _only_empty_markers(directory, names):
            return "ours"
    except FileNotFoundError:
        return "absent"
    except (OSError, EOFError):
        return "unknown"
    return "foreign"


def _starts_with(directory: Location, name: str, prefix: bytes) -> bool:
    path = directory.join(name).path
    size = directory.storage.size(path)
    return size >= len(prefix) and directory.storage.read_bytes(path, 0, len(prefix)) == prefix


def _only_empty_markers(directory: Location, names: list[str]) -> bool:
    """A save killed between creating its marker and writing it leaves exactly this: a
    directory whose only entry is an empty file by the marker's name (which nothing else
    writes). Anything more in it, and it is not provably ours."""
    return all(is_marker_name(n) for n in names) and all(
        directory.storage.size(directory.join(n).path) == 0 for n in names
    )


def _is_marker(directory: Location, name: str) -> bool:
    path = directory.join(name).path
    size = min(directory.storage.size(path), _MARKER_LIMIT)
    try:
        record = json.loads(directory.storage.read_bytes(path, 0, size))
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("writer") == "statevault"


def remove_checkpoint(directory: Location) -> None:
    """Delete a checkpoint directory or prefix of statevault's: the manifest first (it stops
    being a checkpoint), the marker last (what a crash leaves is still recognisably ours)."""
    storage = directory.storage
    storage.remove_file(directory.join(MANIFEST_NAME).path)
    if directory.local:
        fsync_dir(directory.path)
    names = storage.list_dir(directory.path)
    for name in sorted(names, key=is_marker_name):  # markers sort last
        child = directory.join(name)
        if directory.local and storage.is_dir(child.path):
            storage.remove_tree(child.path)
        else:
            storage.remove_file(child.path)
    storage.remove_tree(directory.path)


def is_committed(path: str) -> bool:
    """True when ``path`` holds a committed checkpoint (a manifest; validity is the reader's)."""
    return os.path.isfile(os.path.join(path, MANIFEST_NAME))


def is_temporary(name: str) -> bool:
    return TMP_MARKER in name


def check_target(path: str, overwrite: bool) -> None:
    """Refuse a save whose target would destroy something: call before writing anything."""
    if is_temporary(os.path.basename(path)):
        raise CheckpointError(
            f"{path}: names containing {TMP_MARKER!r} are reserved for saves in flight"
        )
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise CheckpointExistsError(f"{path} exists and is not a checkpoint directory")
    if is_committed(path):
        if not overwrite:
            raise CheckpointExistsError(
                f"a checkpoint already exists at {path}; pass overwrite=True to replace it"
            )
        return
    if os.listdir(path):
        raise CheckpointExistsError(
            f"{path} is a non-empty directory that is not a statevault checkpoint; "
            "refusing to write over it"
        )


def begin(path: str) -> str:
    """Create and return the temporary directory a save of ``path`` writes into, its marker
    already in it."""
    _make_parents_durable(os.path.dirname(os.path.abspath(path)))
    tmp = f"{os.path.abspath(path)}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp)
    try:
        write_marker(Location(LocalStorage(), tmp, tmp))
    except BaseException:
        abandon(tmp)  # a failed marker write leaves nothing behind either
        raise
    return tmp


def _make_parents_durable(directory: str) -> None:
    """Create missing parent directories, fsyncing each new entry into its own parent."""
    if os.path.isdir(directory):
        return
    _make_parents_durable(os.path.dirname(directory))
    try:
        os.mkdir(directory)
    except FileExistsError:
        return
    fsync_dir(os.path.dirname(directory))


def publish(tmp: str, path: str, overwrite: bool) -> None:
    """Atomically make the fully written ``tmp`` the checkpoint at ``path``."""
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    fsync_dir(tmp)
    if is_committed(target):
        if not overwrite:
            raise CheckpointExistsError(
                f"a checkpoint was committed at {path} while this save ran; pass overwrite=True"
            )
        _replace(tmp, target)
    else:
        if os.path.isdir(target) and not os.listdir(target):
            os.rmdir(target)
        os.rename(tmp, target)
    fsync_dir(parent)


def abandon(tmp: str) -> None:
    """Remove a temporary directory of a failed save (best effort; the manager sweeps leftovers)."""
    if os.path.isdir(tmp):
        remove_checkpoint(Location(LocalStorage(), tmp, tmp))


def _replace(tmp: str, target: str) -> None:
    if _exchange(tmp, target):
        remove_checkpoint(Location(LocalStorage(), tmp, tmp))  # now holds the old checkpoint
        return
    # No atomic exchange on this platform or filesystem: move the old one aside first. A crash
    # between the two renames leaves the old checkpoint under <name>.tmp-<id>-old (documented).
    aside = f"{tmp}-old"
    os.rename(target, aside)
    os.rename(tmp, target)
    remove_checkpoint(Location(LocalStorage(), aside, aside))


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically with renameat2; False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE)
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), b)


class LocalCommit:
    """The rename protocol (see the module docstring), for local directories."""

    def check_target(self, target: Location, overwrite: bool) -> None:
        check_target(target.path, overwrite)

    def begin(self, target: Location) -> Location:
        tmp = begin(target.path)
        return Location(target.storage, tmp, tmp)

    def shard_tag(self) -> str:
        return ""

    def before_manifest(self, target: Location, overwrite: bool) -> None:
        return None  # the old checkpoint stays until the rename swaps it out

    def publish(self, written: Location, target: Location, overwrite: bool) -> None:
        publish(written.path, target.path, overwrite)

    def abandon(self, written: Location, keep_marker: bool = False) -> None:
        abandon(written.path)  # a late writer of another rank cannot create files in it again


class ObjectCommit:
    """The manifest-last protocol, for stores without rename (S3, GCS, Azure, memory://).

    Shards are written under the checkpoint's own prefix with names unique to this save, so an
    in-flight save never mixes with a committed one. The manifest, written last, is the commit.
    Replacing a checkpoint deletes the old manifest just before the new one is written (the one
    moment without a checkpoint at that path), then the objects the new manifest does not list.
    A prefix without a manifest is in flight or garbage; load refuses it.
    """

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:8]

    def check_target(self, target: Location, overwrite: bool) -> None:
        if is_temporary(target.name):
            raise CheckpointError(f"{target.url}: names containing {TMP_MARKER!r} are reserved")
        manifest = target.join(MANIFEST_NAME)
        if target.storage.exists(manifest.path):
            if not overwrite:
                raise CheckpointExistsError(
                    f"a checkpoint already exists at {target.url}; pass overwrite=True to "
                    "replace it"
                )
            return
        foreign = [n for n in target.storage.list_dir(target.path) if not is_shard_name(n)]
        if foreign:
            raise CheckpointExistsError(
                f"{target.url} holds objects that are not a statevault checkpoint "
                f"({', '.join(foreign[:3])}); refusing to write over them"
            )

    def begin(self, target: Location) -> Location:
        target.storage.make_dir(target.path)
        write_marker(target, f"-{self.tag}")
        return target

    def shard_tag(self) -> str:
        return f"-{self.tag}"

    def before_manifest(self, target: Location, overwrite: bool) -> None:
        manifest = target.join(MANIFEST_NAME)
        if target.storage.exists(manifest.path):
            if not overwrite:
                raise CheckpointExistsError(
                    f"a checkpoint was committed at {target.url} while this save ran"
                )
            target.storage.remove_file(manifest.path)

    def publish(self, written: Location, target: Location, overwrite: bool) -> None:
        for name in target.storage.list_dir(target.path):
            if is_shard_name(name) and self.tag not in name:
                # shards of the replaced save, or of a save that died here: never anything else
                target.storage.remove_file(target.join(name).path)

    def abandon(self, written: Location, keep_marker: bool = False) -> None:
        """Delete this save's objects, the marker last. ``keep_marker``: leave it, when other
        ranks may still write objects under the prefix: they stay provably statevault's, and a
        sweep removes them once stale (manager/leftovers.py)."""
        ours = [n for n in written.storage.list_dir(written.path) if self.tag in n]
        for name in sorted(ours, key=is_marker_name):  # the marker last
            if not (keep_marker and is_marker_name(name)):
                written.storage.remove_file(written.join(name).path)


def committer_for(target: Location) -> LocalCommit | ObjectCommit:
    return LocalCommit() if target.storage.atomic_rename else ObjectCommit()


def delete_committed(path: str) -> None:
    """Uncommit in one atomic step (rename to a temporary name, fsync), then delete: a crash
    halfway leaves a marked temporary that the next manager sweeps, never a half-deleted step.
    A checkpoint written before markers existed gets one first."""
    here = Location(LocalStorage(), path, path)
    if not any(is_marker_name(name) for name in os.listdir(path)):
        write_marker(here)
    doomed = f"{path}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
    os.rename(path, doomed)
    fsync_dir(os.path.dirname(path))
    remove_checkpoint(Location(LocalStorage(), doomed, doomed))
