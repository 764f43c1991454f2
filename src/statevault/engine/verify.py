"""Check tensors' CRC32C in parallel, in pieces cut at the blocks the manifest records.

A tensor longer than ``BLOCK_BYTES`` carries the running CRC32C at every block boundary, so each
block is checked on its own (from the running CRC before it to the one after it): one large
tensor spreads over every core instead of pinning one. The pieces of all tensors are shared out
by bytes among one thread per CPU (``crc32c`` releases the GIL), each thread a plain loop, so a
thousand small tensors cost a thousand function calls, not a thousand thread-pool tasks.
If every piece of a tensor matches, the chain of running CRCs ends at the tensor's checksum, so
the whole tensor matches.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Sequence
from typing import NamedTuple

from statevault.engine.parallel import cpu_threads, run_parallel
from statevault.format.checksum import ALGORITHM, crc32c_of, parse_checksum
from statevault.format.manifest import BLOCK_BYTES, TensorEntry

PREFIX = ALGORITHM + ":"


class _Piece(NamedTuple):
    key: int  # which tensor (the caller's key)
    view: memoryview
    start: int  # the running CRC before the piece
    expected: int  # the running CRC after it


def _crc_value(text: str) -> int:
    """The value of a ``crc32c:xxxxxxxx`` checksum of a validated manifest row (the manifest
    validator checked the text; this runs for every block of every load, so it only slices)."""
    if not text.startswith(PREFIX):
        return parse_checksum(text)  # raises, naming what is wrong
    return int(text[len(PREFIX) :], 16)


def pieces_of(key: int, entry: TensorEntry, view: memoryview) -> list[_Piece]:
    """The pieces checking ``view`` (the tensor's bytes) against ``entry``'s checksums."""
    final = _crc_value(entry.checksum)
    if not entry.blocks or len(entry.blocks) != entry.block_count() - 1:
        return [_Piece(key, view, 0, final)]
    ends = [*map(_crc_value, entry.blocks), final]
    pieces = []
    start = 0
    for k, end in enumerate(ends):
        pieces.append(_Piece(key, view[k * BLOCK_BYTES : (k + 1) * BLOCK_BYTES], start, end))
        start = end
    return pieces


def failed(items: Sequence[tuple[int, TensorEntry, memoryview]], threads: int = 0) -> set[int]:
    """The keys of the (key, entry, bytes) items whose bytes do not match their checksums."""
    pieces = [piece for key, entry, view in items for piece in pieces_of(key, entry, view)]
    count = max(1, min(threads or cpu_threads(), len(pieces)))
    groups: list[list[_Piece]] = [[] for _ in range(count)]
    heap = [(0, slot) for slot in range(count)]
    for piece in sorted(pieces, key=lambda p: -len(p.view)):  # largest first, onto the lightest
        load, slot = heapq.heappop(heap)
        groups[slot].append(piece)
        heapq.heappush(heap, (load + len(piece.view), slot))
    calls = [functools.partial(_check, group) for group in groups if group]
    if not calls:
        return set()
    return set().union(*run_parallel(calls, "statevault-verify"))


def _check(pieces: Sequence[_Piece]) -> set[int]:
    return {p.key for p in pieces if crc32c_of(p.view, p.start) != p.expected}
