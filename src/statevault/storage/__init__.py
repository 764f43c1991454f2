"""Where checkpoint bytes live. See :mod:`statevault.storage.base` for the protocol."""

from statevault.storage.base import Storage, WriteHandle
from statevault.storage.local import LocalStorage

__all__ = ["LocalStorage", "Storage", "WriteHandle"]
