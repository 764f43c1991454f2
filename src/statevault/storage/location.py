"""Where a checkpoint or run lives: a plain path (the local fast path) or any fsspec URL.

Credentials and endpoints come the usual fsspec way, ``storage_options`` or the environment;
statevault never writes them anywhere. On S3 it adds a bounded retry budget where the options
set none (see :mod:`statevault.storage.fsspec_storage`).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from statevault.errors import StorageError
from statevault.storage.base import Storage
from statevault.storage.fsspec_storage import FsspecStorage, with_retry_budget
from statevault.storage.local import LocalStorage

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Location:
    storage: Storage
    path: str  # an absolute local path, or the filesystem's own path (bucket/key)
    url: str  # what messages show

    @property
    def local(self) -> bool:
        return isinstance(self.storage, LocalStorage)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def join(self, name: str) -> Location:
        if self.local:
            return Location(
                self.storage, os.path.join(self.path, name), os.path.join(self.url, name)
            )
        return Location(
            self.storage, posixpath.join(self.path, name), f"{self.url.rstrip('/')}/{name}"
        )

    def sibling(self, name: str) -> Location:
        parent = os.path.dirname(self.path) if self.local else posixpath.dirname(self.path)
        url_parent = self.url.rstrip("/").rsplit("/", 1)[0]
        if self.local:
            return Location(self.storage, os.path.join(parent, name), os.path.join(parent, name))
        return Location(self.storage, posixpath.join(parent, name), f"{url_parent}/{name}")


def local_directory(target: PathLike) -> str | None:
    """The absolute local path a plain path or ``file://`` URL names; None for any other URL."""
    text = os.fspath(target)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return None if "://" in text else os.path.abspath(text)


def resolve(
    target: PathLike | Location, storage_options: Mapping[str, Any] | None = None
) -> Location:
    """The location a path or URL names. ``file://`` and plain paths are local."""
    if isinstance(target, Location):
        return target
    text = os.fspath(target)
    path = local_directory(text)
    if path is not None:
        return Location(LocalStorage(), path, path)
    import fsspec  # only when a URL is used

    protocol = text.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(text, **with_retry_budget(protocol, storage_options))
    except ImportError as exc:
        raise StorageError(
            f"{text}: the {protocol}:// filesystem is not installed ({exc}); for S3 install "
            "'statevault[s3]', for other stores the fsspec package that serves the scheme"
        ) from None
    except ValueError as exc:
        raise StorageError(f"{text}: unknown storage scheme {protocol}:// ({exc})") from None
    return Location(FsspecStorage(fs, protocol), path.rstrip("/"), text.rstrip("/"))
