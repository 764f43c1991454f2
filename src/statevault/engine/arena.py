"""Staging memory: large host buffers, faulted in ahead of time and reused across saves.

Copying into freshly allocated memory costs page faults that can double the cost of the copy, so
an asynchronous save stages into an arena whose pages were faulted in earlier, off the training
path, and the same pages serve every later save. Chunks are anonymous mmaps with transparent
huge pages requested, which also makes any growth cheaper. Slices are 64-byte aligned so that
any dtype can be viewed in place.

``prewarm`` creates the chunks at once and faults them in from a background thread with
``madvise(MADV_POPULATE_WRITE)``: one system call per chunk, made without the GIL, that never
changes what the memory holds, so a save may use a chunk while it is still being warmed (it
never waits for the prewarm). Where the kernel lacks it (before Linux 5.14) a chunk is warmed by
writing to every page instead, and a save waits for that one chunk.

A framework may need the memory registered with a device (CUDA pinned memory): it registers a
chunk once through ``on_new_chunk`` callbacks, and the registration stays with the chunk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

ALIGN = 64
MIN_CHUNK = 64 << 20
_PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = 23


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


_LIBC = _libc()


class _Chunk:
    def __init__(self, size: int) -> None:
        self.size = size
        self.memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.memory.madvise(mmap.MADV_HUGEPAGE)
        self.view = memoryview(self.memory)
        self.used = 0
        self.registered: set[Callable[[memoryview], None]] = set()
        self.lock = threading.Lock()
        self.ready = threading.Event()  # set once warm, or at once when warming is harmless
        self.array: Any = np.frombuffer(self.memory, dtype=np.uint8)

    def populate(self) -> bool:
        """Fault every page in without touching content; False where the kernel cannot."""
        if _LIBC is None:
            return False
        address = ctypes.c_void_p(self.array.ctypes.data)
        result = _LIBC.madvise(address, ctypes.c_size_t(self.size), _MADV_POPULATE_WRITE)
        return int(result) == 0

    def touch(self) -> None:
        """Fault every page in by writing it (numpy releases the GIL for the strided store)."""
        self.array[::_PAGE] = 0


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
        self.on_release: list[Callable[[memoryview], None]] = []

    @property
    def capacity(self) -> int:
        return sum(c.size for c in self._chunks)

    def prewarm(self, nbytes: int, background: bool = True) -> None:
        """Grow to at least ``nbytes`` now and fault the new memory in (see the module doc)."""
        if nbytes <= self.capacity:
            return
        fresh: list[_Chunk] = []
        missing = nbytes - self.capacity
        while missing > 0:
            chunk = _Chunk(max(self.min_chunk, min(missing, 1 << 30) // _PAGE * _PAGE or _PAGE))
            fresh.append(chunk)
            missing -= chunk.size
        with self._lock:
            self._chunks.extend(fresh)
        if not background:
            self._warm(fresh)
            return
        previous = self._warming
        self._warming = threading.Thread(
            target=self._warm_after, args=(previous, fresh), name="statevault-prewarm", daemon=True
        )
        self._warming.start()

    def _warm_after(self, previous: threading.Thread | None, chunks: list[_Chunk]) -> None:
        if previous is not None:
            previous.join()
        self._warm(chunks)

    def _warm(self, chunks: list[_Chunk]) -> None:
        for chunk in chunks:
            if chunk.populate():
                chunk.ready.set()  # content-safe: usable while the rest warms
            else:
                chunk.touch()
            self._register(chunk)
            chunk.ready.set()

    def add_registration(
        self, register: Callable[[memoryview], None], unregister: Callable[[memoryview], None]
    ) -> None:
        """Apply ``register`` to every chunk, now and as chunks are made, once per chunk;
        ``unregister`` runs on each registered chunk when the arena is released."""
        with self._lock:
            if register in self.on_new_chunk:
                return
            self.on_new_chunk.append(register)
            self.on_release.append(unregister)
            chunks = list(self._chunks)
        for chunk in chunks:
            self._register(chunk)

    def _register(self, chunk: _Chunk) -> None:
        with chunk.lock:  # the prewarm thread and a save may both meet a new chunk
            for register in list(self.on_new_chunk):
                if register not in chunk.registered:
                    register(chunk.view)
                    chunk.registered.add(register)

    def wait_warm(self) -> None:
        """Block until every prewarm started so far has finished (tests and shutdown)."""
        if self._warming is not None:
            self._warming.join()
            self._warming = None

    def take(self, nbytes: int) -> memoryview:
        """A slice of ``nbytes`` (64-byte aligned); grows the arena when it is full."""
        with self._lock:
            for chunk in self._chunks:
                start = -(-chunk.used // ALIGN) * ALIGN
                if start + nbytes <= chunk.size:
                    chunk.used = start + nbytes
                    break
            else:
                chunk, start = self._new_chunk(nbytes), 0
                chunk.used = nbytes
        chunk.ready.wait()  # only a chunk being warmed by writing: never a populate
        return chunk.view[start : start + nbytes]

    def _new_chunk(self, nbytes: int) -> _Chunk:
        """A chunk grown on the spot (the state outgrew the prewarm); the caller holds the lock."""
        chunk = _Chunk(max(self.min_chunk, -(-nbytes // _PAGE) * _PAGE))
        self._register(chunk)
        chunk.ready.set()
        self._chunks.append(chunk)
        return chunk

    def reset(self) -> None:
        with self._lock:
            for chunk in self._chunks:
                chunk.used = 0

    def release(self) -> None:
        """Drop the arena's memory. Not closed explicitly: a slice may still be referenced (by
        a failed save's traceback, say), and the mapping goes when its last view does."""
        self.wait_warm()
        with self._lock:
            chunks, self._chunks = self._chunks, []
        for chunk in chunks:
            if chunk.registered:
                for unregister in self.on_release:
                    unregister(chunk.view)
