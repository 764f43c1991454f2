"""How exports and imports say how far they are: a byte count, for a progress bar.

The total is known only once the work is planned (an export reads the manifest and picks its
arrays first), so a progress object is told the total by the operation itself, then every
batch of bytes as it is done.
"""

from __future__ import annotations

from statevault.engine.progress import ByteProgress

__all__ = ["ByteProgress", "Capped", "NoProgress"]


class NoProgress:
    """A ByteProgress that shows nothing (the default)."""

    def start(self, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass


class Capped:
    """Passes on ``advance`` calls without ever passing ``total``; ``finish`` advances by what is
    left. For sources that count what they read, which may re-read a few bytes (a zip's
    directory) or skip some, while the promise is a sum of exactly ``total``."""

    def __init__(self, inner: ByteProgress, total: int) -> None:
        self.inner = inner
        self.left = total
        inner.start(total)

    def advance(self, amount: int) -> None:
        step = min(amount, self.left)
        if step > 0:
            self.left -= step
            self.inner.advance(step)

    def finish(self) -> None:
        self.advance(self.left)
