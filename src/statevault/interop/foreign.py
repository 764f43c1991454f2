"""Calling other tools' readers quietly: what they would print is captured, and their messages
are cleaned before a statevault error quotes them.

While torch reads a file it talks to the user's terminal three ways, none of which belongs on
it once statevault has turned the failure into one clear error:

- ``warnings.warn`` (``UserWarning: 'torch.load' received a zip file that looks like a
  TorchScript archive``; ``Detected pickle protocol 4``);
- records on the *root* logger, with tracebacks (DCP's loader logs "Global metadata is not
  found" with ``exc_info`` before it raises);
- ANSI escape sequences inside exception messages (``\\x1b[1m...\\x1b[0m``), which a terminal
  would interpret and a log file shows as garbage.

:func:`quietly` captures the first two for the duration of one read (a warning can explain the
failure that follows, so callers fold :attr:`Captured.notes` into their error); :func:`clean`
strips the third.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

# CSI (colours, bold: ESC [ ... final byte), OSC (titles, links: ESC ] ... BEL or ESC \) and
# the two-byte escapes; whatever of ESC is left after those goes too.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?")
# Log records from code under these package directories are the foreign readers' own.
_FOREIGN_PACKAGES = ("torch", "tensorflow", "keras", "absl")
_MAX_NOTE = 300


def clean(text: str) -> str:
    """``text`` without ANSI escape sequences, its whitespace runs collapsed to one space."""
    return " ".join(_ANSI.sub("", text).split())


def shorten(text: str, limit: int = _MAX_NOTE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Captured:
    """What a foreign reader tried to print while :func:`quietly` was active (filled as it
    happens, so an ``except`` inside the block already sees the warnings that came before)."""

    records: list[warnings.WarningMessage] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        """Each distinct warning's message, cleaned and cut to one line, without its category
        (``UserWarning`` says nothing to a user) or final period; log records are the error's
        own tracebacks, not repeated."""
        texts = (clean(str(w.message)).rstrip(".") for w in self.records)
        return list(dict.fromkeys(shorten(text) for text in texts if text))


class _Catch(logging.Filter):
    """On the root logger: keeps records logged there by foreign packages, drops them."""

    def __init__(self, into: Captured) -> None:
        super().__init__()
        self.into = into

    def filter(self, record: logging.LogRecord) -> bool:
        if not _is_foreign(record.pathname):
            return True
        self.into.logs.append(record.getMessage())
        return False


def _is_foreign(pathname: str) -> bool:
    parts = os.path.normpath(pathname).split(os.sep)
    return any(package in parts for package in _FOREIGN_PACKAGES)


@contextlib.contextmanager
def quietly() -> Iterator[Captured]:
    """Capture, for the block, every warning and every foreign record logged on the root
    logger (torch's DCP loader logs there, not on a logger of its own). Records of the caller's
    own code and of named loggers pass as usual. Not thread-safe (``warnings`` state is
    process-wide): meant around one synchronous read. Example::

        with quietly() as captured:
            state = torch.load(path, weights_only=True)
    """
    root = logging.getLogger()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        captured = Captured(records)
        catch = _Catch(captured)
        root.addFilter(catch)
        try:
            yield captured
        finally:
            root.removeFilter(catch)
