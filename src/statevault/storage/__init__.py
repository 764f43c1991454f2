"""Where checkpoint bytes live. See :mod:`statevault.storage.base` for the protocol."""

from statevault.storage.base import Storage, WriteHandle
from statevault.storage.fsspec_storage import FsspecStorage
from statevault.storage.local import LocalStorage
from statevault.storage.location import Location, resolve

__all__ = ["FsspecStorage", "LocalStorage", "Location", "Storage", "WriteHandle", "resolve"]
