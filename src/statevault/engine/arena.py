"""Staging memory: large host buffers, faulted in ahead of time and reused across saves.

Copying into freshly allocated memory costs page faults that can double the cost of the copy, so
an asynchronous save stages into an arena whose pages were touched earlier, off the training
path (``prewarm`` in a background thread), and the same pages serve every later save. Chunks are
anonymous mmaps with transparent huge pages requested, which also makes any growth cheaper.
Slices are 64-byte aligned so that any dtype can be viewed in place.

A framework may need the memory registered with a device (CUDA pinned memory): it registers a
chunk once through ``on_new_chunk`` callbacks, and the registration stays with the chunk.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable

import numpy as np

ALIGN = 64
MIN_CHUNK = 64 << 20
_PAGE = mmap.PAGESIZE


class _Chunk:
    def __init__(self, size: int) -> None:
        self.size = size
        self.memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.memory.madvise(mmap.MADV_HUGEPAGE)
        self.view = memoryview(self.memory)
        self.used = 0

    def touch(self) -> None:
        """Fault every page in now, so that the first copy into it runs at memcpy speed.

        One strided numpy store per page: numpy releases the GIL for it, so a prewarm in a
        background thread does not hold up the training thread.
        """
        np.frombuffer(self.memory, dtype=np.uint8)[::_PAGE] = 0


class StagingArena:
    """Bump-allocated host memory; ``reset`` makes it all free again for the next save."""

    def __init__(self, limit_bytes: int | None = None) -> None:
        # Chunks are made at least MIN_CHUNK big to limit their number, but never past a
        # small staging budget: the budget is a promise about host memory.
        self.min_chunk = min(MIN_CHUNK, limit_bytes) if limit_bytes else MIN_CHUNK
        self._chunks: list[_Chunk] = []
        self._lock = threading.Lock()
        self._warming: threading.Thread | None = None
        self.on_new_chunk: list[Callable[[memoryview], None]] = []

    @property
    def capacity(self) -> int:
        return sum(c.size for c in self._chunks)

    def prewarm(self, nbytes: int, background: bool = True) -> None:
        """Grow to at least ``nbytes`` with every page faulted in, in a background thread."""
        self.wait_warm()
        if nbytes <= self.capacity:
            return
        if not background:
            self._grow(nbytes - self.capacity, touch=True)
            return
        self._warming = threading.Thread(
            target=self._grow,
            args=(nbytes - self.capacity, True),
            name="statevault-prewarm",
            daemon=True,
        )
        self._warming.start()

    def wait_warm(self) -> None:
        if self._warming is not None:
            self._warming.join()
            self._warming = None

    def take(self, nbytes: int) -> memoryview:
        """A slice of ``nbytes`` (64-byte aligned); grows the arena when it is full."""
        self.wait_warm()
        with self._lock:
            for chunk in self._chunks:
                start = -(-chunk.used // ALIGN) * ALIGN
                if start + nbytes <= chunk.size:
                    chunk.used = start + nbytes
                    return chunk.view[start : start + nbytes]
        chunk = self._grow(nbytes, touch=False)
        with self._lock:
            chunk.used = nbytes
        return chunk.view[:nbytes]

    def reset(self) -> None:
        with self._lock:
            for chunk in self._chunks:
                chunk.used = 0

    def chunks(self) -> list[memoryview]:
        """Views of every chunk (for a framework that registers memory with a device)."""
        with self._lock:
            return [chunk.view for chunk in self._chunks]

    def _grow(self, nbytes: int, touch: bool) -> _Chunk:
        size = max(self.min_chunk, -(-nbytes // _PAGE) * _PAGE)
        chunk = _Chunk(size)
        if touch:
            chunk.touch()
        for register in self.on_new_chunk:
            register(chunk.view)
        with self._lock:
            self._chunks.append(chunk)
        return chunk

    def release(self) -> None:
        """Drop the arena's memory. Not closed explicitly: a slice may still be referenced (by
        a failed save's traceback, say), and the mapping goes when its last view does."""
        self.wait_warm()
        with self._lock:
            self._chunks = []


HUGE_PAGE_THRESHOLD = 1 << 20


def fresh_host_memory(nbytes: int) -> mmap.mmap | None:
    """Anonymous memory for one large loaded array, with transparent huge pages requested.

    Reading a checkpoint into freshly allocated memory is dominated by page faults; huge pages
    cut them by 512x (measured: fresh malloc'd buffers read 4x slower than huge-page ones, which
    read as fast as buffers touched beforehand). None for small arrays: malloc serves them.
    """
    if nbytes < HUGE_PAGE_THRESHOLD:
        return None
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return memory
