"""The commit protocol, and the one test of whether a checkpoint exists.

A checkpoint exists if and only if ``<dir>/manifest.json`` exists (and parses: checked by the
reader). On a local disk a save writes everything under ``<name>.tmp-<id>``, fsyncs every file and
the directory, then renames it to ``<name>`` and fsyncs the parent. Replacing a committed
checkpoint swaps the two directories with one atomic ``renameat2(RENAME_EXCHANGE)`` so that no
instant exists without a committed checkpoint at ``<name>``; the old one, now under the temporary
name, is deleted manifest first. Temporaries are never listed or loaded; the manager sweeps them.

On object stores (no rename) the manifest is the last object written: :class:`ObjectCommit`.
One rule, two protocols.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import uuid

from statevault.errors import CheckpointError, CheckpointExistsError
from statevault.format.names import MANIFEST_NAME, is_shard_name
from statevault.storage.local import LocalStorage, fsync_dir
from statevault.storage.location import Location

TMP_MARKER = ".tmp-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


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
    """Create and return the temporary directory a save of ``path`` writes into."""
    _make_parents_durable(os.path.dirname(os.path.abspath(path)))
    tmp = f"{os.path.abspath(path)}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp)
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
        LocalStorage().remove_tree(tmp)


def _replace(tmp: str, target: str) -> None:
    if _exchange(tmp, target):
        LocalStorage().remove_tree(tmp)  # now holds the old checkpoint
        return
    # No atomic exchange on this platform or filesystem: move the old one aside first. A crash
    # between the two renames leaves the old checkpoint under <name>.tmp-<id>-old (documented).
    aside = f"{tmp}-old"
    os.rename(target, aside)
    os.rename(tmp, target)
    LocalStorage().remove_tree(aside)


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

    def abandon(self, written: Location) -> None:
        abandon(written.path)


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

    def abandon(self, written: Location) -> None:
        for name in written.storage.list_dir(written.path):
            if self.tag in name:
                written.storage.remove_file(written.join(name).path)


def committer_for(target: Location) -> LocalCommit | ObjectCommit:
    return LocalCommit() if target.storage.atomic_rename else ObjectCommit()


def delete_committed(path: str) -> None:
    """Uncommit in one atomic step (rename to a temporary name, fsync), then delete: a crash
    halfway leaves a temporary that the next manager sweeps, never a half-deleted step."""
    doomed = f"{path}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
    os.rename(path, doomed)
    fsync_dir(os.path.dirname(path))
    LocalStorage().remove_tree(doomed)
