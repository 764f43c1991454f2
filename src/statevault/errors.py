"""The statevault exception tree.

Every error statevault raises on purpose is a :class:`CheckpointError`, so a caller can catch one
type and know nothing else escaped::

    CheckpointError                     base of everything below
    ├── CheckpointNotFoundError         no committed checkpoint at that path
    ├── CheckpointExistsError           save onto a committed checkpoint without overwrite=True
    ├── CorruptCheckpointError          bytes that do not match the manifest: bad checksum,
    │                                   truncated or missing file, hostile or malformed metadata
    ├── UnsupportedFormatError          a format_version this statevault cannot read
    ├── StateMismatchError              the checkpoint does not fit the objects given as ``into``
    ├── UnsupportedValueError           a value in the state that the format cannot represent
    ├── RunLockedError                  another live CheckpointManager writes this run
    ├── StorageError                    the storage refused, or failed after the client's bounded
    │                                   retries (unreachable endpoint, timeout, no credentials,
    │                                   access denied, no bucket, full or read-only disk); names
    │                                   the path or URL and chains the cause
    └── DistributedSaveError            a save of a distributed job failed on some rank (or a
                                        rank died): nothing was committed; names the ranks

Messages say what failed, where (key path, file) and, where there is one, how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DistributedSaveError",
    "RunLockedError",
    "StateMismatchError",
    "StorageError",
    "UnsupportedFormatError",
    "UnsupportedValueError",
]


class CheckpointError(Exception):
    """Base class of every error statevault raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """There is no committed checkpoint at the given path (in-flight saves do not count)."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already exists where a save was asked to write."""


class CorruptCheckpointError(CheckpointError):
    """The checkpoint's bytes disagree with its manifest, or the manifest itself is damaged.

    ``problems`` lists every problem found, each naming the leaf and file concerned.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) or [message]


class UnsupportedFormatError(CheckpointError):
    """The checkpoint was written in a format version this statevault does not know."""


class StateMismatchError(CheckpointError):
    """The saved state does not fit the objects it is loaded into.

    ``missing`` are key paths the target has and the checkpoint lacks, ``unexpected`` the
    reverse, and ``mismatched`` describes leaves whose shape, dtype or type differ.
    """

    def __init__(
        self,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        super().__init__(self._describe())

    def _describe(self) -> str:
        lines = ["the checkpoint does not match the objects given as `into`:"]
        lines += [f"  missing in checkpoint: {k}" for k in self.missing]
        lines += [f"  unexpected in checkpoint: {k}" for k in self.unexpected]
        lines += [f"  mismatched: {m}" for m in self.mismatched]
        lines.append("pass strict=False to restore what matches and report the rest")
        return "\n".join(lines)


class UnsupportedValueError(CheckpointError, TypeError):
    """A value in the state cannot be represented in the format; names its key path."""

    def __init__(self, key_path: str, detail: str) -> None:
        self.key_path = key_path
        super().__init__(f"cannot save the value at {key_path or '<root>'}: {detail}")


class RunLockedError(CheckpointError):
    """Another live manager holds the run directory's writer lock; names the holder."""


class StorageError(CheckpointError, OSError):
    """The storage refused an operation, or failed after the client's bounded retries; names
    the path or URL and the fix, and chains the storage's own error."""


class DistributedSaveError(CheckpointError):
    """A distributed save did not commit: a rank failed, disagreed or died. Raised on every
    surviving rank; ``ranks`` lists the ranks that reported a failure (empty when one vanished)."""

    def __init__(self, message: str, ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.ranks = list(ranks)
