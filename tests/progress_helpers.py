"""A ByteProgress for the tests: it remembers what it was told, and refuses an advance before
its start (the protocol's call order, interop/progress.py)."""

from __future__ import annotations


class Recorder:
    """A ByteProgress that remembers what it was told."""

    def __init__(self) -> None:
        self.totals: list[int] = []
        self.advances: list[int] = []

    def start(self, total: int) -> None:
        self.totals.append(total)

    def advance(self, amount: int) -> None:
        assert self.totals, "advance before start"
        self.advances.append(amount)
