"""O_DIRECT writes: shard bytes go from page-aligned buffers straight to the disk.

Why: a buffered write copies every byte into page cache pages the kernel must first find; on a
VM that hands free memory back to its host, finding them costs ~0.3-3 s/GiB and makes buffered
write + fsync times swing 5x from one save to the next. O_DIRECT skips the page cache: the time
is the disk's, and a save does not evict what training keeps cached.

How: :class:`DirectSink` wraps an open :class:`~statevault.storage.local.LocalWriteHandle`. It
turns ``O_DIRECT`` on for the handle's descriptor (``fcntl``), copies what it is given into a
pair of page-aligned bounce buffers (the source bytes may sit anywhere, and a tensor's offset in
a shard is rarely aligned), and hands each full buffer to ``handle.write`` in a background thread
while the next one fills, so the copy overlaps the disk. At the end, the last whole pages go out
direct, ``O_DIRECT`` is turned off and the unaligned tail is written buffered; the handle's
``close`` fsyncs as before (file size and the disk's write cache).

Fallback: a filesystem that refuses ``O_DIRECT`` (``EINVAL`` from ``fcntl`` or from the first
write, as tmpfs, some FUSE and network filesystems do) gets the buffered path for that write,
and its device is remembered so that later files there skip the attempt. ``STATEVAULT_DIRECT_IO=0``
turns it off; ``=1`` (the default) uses it wherever the filesystem accepts it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import queue
import threading
from types import TracebackType

import numpy as np

from statevault.storage.local import LocalWriteHandle

ALIGN = 4096  # covers every logical block size in use (512 B and 4 KiB)
BUFFER_BYTES = 4 << 20  # per bounce buffer, two per file being written (4 MiB: a disk request)
MIN_BYTES = 1 << 20  # smaller files gain nothing from skipping the page cache
POOL_LIMIT = 16  # bounce buffers kept for reuse (faulted in already): 64 MiB at most
_O_DIRECT = getattr(os, "O_DIRECT", 0)

_refused: set[int] = set()  # st_dev of filesystems that refused O_DIRECT
_refused_lock = threading.Lock()


def enabled() -> bool:
    """Whether shard writes try O_DIRECT (``STATEVAULT_DIRECT_IO``, default on)."""
    return bool(_O_DIRECT) and os.environ.get("STATEVAULT_DIRECT_IO", "1") != "0"


def refused(device: int) -> bool:
    with _refused_lock:
        return device in _refused


def _remember_refusal(device: int) -> None:
    with _refused_lock:
        _refused.add(device)


def forget_refusals() -> None:
    """Try O_DIRECT again everywhere (tests)."""
    with _refused_lock:
        _refused.clear()


class _Pool:
    """Page-aligned buffers (anonymous mmaps, huge pages asked for), kept faulted in for reuse."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            while self._free:
                memory = self._free.pop()
                if len(memory) == BUFFER_BYTES:
                    return memory
        memory = mmap.mmap(-1, BUFFER_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            memory.madvise(mmap.MADV_HUGEPAGE)
        return memory

    def give(self, memory: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < POOL_LIMIT:
                self._free.append(memory)
                return
        with contextlib.suppress(BufferError):  # a view still alive: the mapping goes with it
            memory.close()


_POOL = _Pool()


def _copy(memory: mmap.mmap, at: int, view: memoryview) -> None:
    """memcpy ``view`` into ``memory`` at ``at``, the GIL released (numpy's copy loop)."""
    target = np.frombuffer(memory, dtype=np.uint8, count=len(view), offset=at)
    np.copyto(target, np.frombuffer(view, dtype=np.uint8))


def open_sink(handle: object, size: int | None = None) -> DirectSink | None:
    """A direct sink over ``handle`` where O_DIRECT may work, else None (write buffered).
    ``size``: the bytes the file will hold; files under ``MIN_BYTES`` are written buffered."""
    if not enabled() or not isinstance(handle, LocalWriteHandle) or handle.fd is None:
        return None
    if size is not None and size < MIN_BYTES:
        return None
    device = os.fstat(handle.fd).st_dev
    if refused(device):
        return None
    flags = fcntl.fcntl(handle.fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(handle.fd, fcntl.F_SETFL, flags | _O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _remember_refusal(device)
        return None
    return DirectSink(handle, device, flags)


class DirectSink:
    """Sequential writes through aligned bounce buffers (see the module doc). Use as a context
    manager inside the handle's own ``with``: leaving it normally writes the tail, leaving it by
    an exception stops the background write first (the handle then aborts the file)."""

    def __init__(self, handle: LocalWriteHandle, device: int, buffered_flags: int) -> None:
        self.handle = handle
        self.device = device
        self.buffered_flags = buffered_flags
        self.direct = True
        self.offset = 0  # file offset of the current buffer's first byte
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        self._owned = [_POOL.take(), _POOL.take()]
        for memory in self._owned:
            self._free.put(memory)
        self._current: mmap.mmap | None = None
        self._fill = 0
        self._jobs: queue.Queue[tuple[mmap.mmap, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._work, name="statevault-direct", daemon=True)
        self._worker.start()

    # ---- the caller's side -------------------------------------------------------------------

    def write(self, data: memoryview) -> None:
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        while len(view):
            self._raise_background_error()
            if self._current is None:
                self._current, self._fill = self._free.get(), 0
            count = min(len(view), BUFFER_BYTES - self._fill)
            _copy(self._current, self._fill, view[:count])
            self._fill += count
            view = view[count:]
            if self._fill == BUFFER_BYTES:
                self._submit(BUFFER_BYTES)

    def finish(self) -> None:
        """Write what is left: its whole pages direct, the rest buffered; then stop the worker."""
        if self._current is not None and self._fill:
            aligned = self._fill // ALIGN * ALIGN
            tail = self._fill - aligned
            if aligned:
                self._submit(aligned, keep=tail)
            self._stop()
            self._raise_background_error()
            if tail:
                self._buffered()
                assert self._current is not None
                self.handle.write(memoryview(self._current)[aligned : aligned + tail])
        else:
            self._stop()
            self._raise_background_error()

    def _submit(self, length: int, keep: int = 0) -> None:
        """Queue the current buffer's first ``length`` bytes; ``keep``: bytes after them stay
        for the caller to write (the tail), so the buffer is not reused."""
        assert self._current is not None
        self._jobs.put((self._current, length))
        if not keep:
            self._current, self._fill = None, 0

    def _stop(self) -> None:
        self._jobs.put(None)
        self._worker.join()

    def _raise_background_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _buffered(self) -> None:
        if self.direct:
            assert self.handle.fd is not None
            fcntl.fcntl(self.handle.fd, fcntl.F_SETFL, self.buffered_flags)
            self.direct = False

    # ---- the background writer ---------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            memory, length = job
            if self._error is None:
                try:
                    self._write_out(memoryview(memory)[:length])
                except BaseException as exc:  # raised in the caller's thread
                    self._error = exc
            self.offset += length
            self._free.put(memory)

    def _write_out(self, view: memoryview) -> None:
        try:
            self.handle.write(view)
        except OSError as exc:
            # A filesystem may accept the flag and refuse the write: nothing was written, so
            # the same bytes go out buffered, as will every later file on it.
            if exc.errno != errno.EINVAL or not self.direct or self.offset:
                raise
            _remember_refusal(self.device)
            self._buffered()
            self.handle.write(view)

    # ---- context manager ---------------------------------------------------------------------

    def __enter__(self) -> DirectSink:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if kind is None:
                self.finish()
            elif self._worker.is_alive():
                self._error = self._error or RuntimeError("aborted")  # skip queued writes
                self._stop()
        finally:
            for memory in self._owned:
                _POOL.give(memory)
            self._owned = []
