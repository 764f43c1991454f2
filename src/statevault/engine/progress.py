"""How a long operation (verify, export, import) says how far it is: a byte count, for a
progress bar. Pure: no I/O, no framework; every layer above may take one."""

from __future__ import annotations

from typing import Protocol


class ByteProgress(Protocol):
    """Told the bytes an export or import will move, then each batch as it is done.

    Call order: ``start(total)`` exactly once, before the first byte moves; then
    ``advance(amount)`` any number of times, from the calling thread, the amounts (each > 0)
    summing to ``total`` when the operation succeeds (it may stop short on failure). Example::

        class Printer:
            def start(self, total: int) -> None:
                self.total, self.done = total, 0

            def advance(self, amount: int) -> None:
                self.done += amount
                print(f"{self.done}/{self.total} bytes")

        export_safetensors("ckpt/step_1000", "model.safetensors", progress=Printer())
    """

    def start(self, total: int) -> None: ...

    def advance(self, amount: int) -> None: ...
