"""The physical floors every checkpointer is measured against, in the same run.

- write floor: the state's bytes from one contiguous host buffer, one sequential pass of 16 MiB
  ``write`` calls into a fresh file, then ``fsync``: one plain (buffered) sequential write;
- copy floor: every state tensor copied into preallocated, already-faulted host buffers (CPU:
  one single-threaded memcpy per tensor; CUDA: non-blocking copies into pinned buffers and one
  synchronize): the least a save must stall training for, since training mutates the state
  right after;
- read floor: the raw file read back into a preallocated host buffer (page cache warm: the
  benchmark cannot drop caches, so every load in the table is a warm-cache load too); on CUDA
  also read + one host-to-device copy into a preallocated device buffer.

References that are not floors help to read the table: the same write with ``O_DIRECT`` (past the
page cache, from the same page-aligned buffer: what the disk does when the page cache is out of
the way), torch's own ``copy_`` of the state (its intra-op threads) and the cost of faulting in
fresh host memory of the state's size.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

# Bytes per write/read call. One 1 GiB write() measured 2-4x slower than 16 MiB calls on the
# development VM (reads do not care), so the floor writes in 16 MiB calls, one sequential pass.
IO_CHUNK = 16 << 20


def contiguous_bytes(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One host uint8 buffer holding the bytes of ``tensors`` back to back (pages faulted in),
    page-aligned (an anonymous mapping) so that it can also be written with ``O_DIRECT``."""
    total = sum(t.numel() * t.element_size() for t in tensors)
    memory = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer = torch.frombuffer(memory, dtype=torch.uint8, count=total)
    offset = 0
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        flat = tensor.detach().reshape(-1).view(torch.uint8)
        buffer[offset : offset + size].copy_(flat)
        offset += size
    return buffer


def write_floor(buffer: torch.Tensor, path: str) -> float:
    """Seconds to write ``buffer`` into a fresh file at ``path`` and fsync it."""
    view = memoryview(buffer.numpy()).cast("B")
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        while len(view):
            written = os.write(fd, view[:IO_CHUNK])
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def direct_write(buffer: torch.Tensor, path: str) -> float:
    """Seconds to write ``buffer`` (page-aligned) into a fresh file with ``O_DIRECT`` in 16 MiB
    calls (the last partial page buffered), then ``fsync``. OSError where the filesystem refuses
    ``O_DIRECT``."""
    view = memoryview(buffer.numpy()).cast("B")
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        aligned = len(view) // 4096 * 4096
        offset = 0
        while offset < aligned:
            offset += os.write(fd, view[offset : min(offset + IO_CHUNK, aligned)])
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        while offset < len(view):
            offset += os.write(fd, view[offset:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def read_floor(path: str, buffer: torch.Tensor) -> float:
    """Seconds to read the file at ``path`` into the preallocated ``buffer`` (warm cache)."""
    view = memoryview(buffer.numpy()).cast("B")
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < len(view):
            count = os.preadv(fd, [view[offset : offset + IO_CHUNK]], offset)
            if count == 0:
                raise EOFError(f"{path} ended at byte {offset}")
            offset += count
    finally:
        os.close(fd)
    return time.perf_counter() - started


def files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]


def evict(path: str) -> None:
    """Drop every file under ``path`` from the page cache (``fsync``, then
    ``posix_fadvise(DONTNEED)``): the next read of it goes to the disk. Dropping all caches
    needs root; dropping a file's own clean pages does not."""
    for name in files_under(path):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(path: str) -> float:
    """The fraction of the pages of the files under ``path`` that sit in the page cache
    (``mincore``): how cold an evicted file really is."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    resident = total = 0
    for name in files_under(path):
        size = os.path.getsize(name)
        if size == 0:
            continue
        fd = os.open(name, os.O_RDONLY)
        try:
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE)
        finally:
            os.close(fd)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = (ctypes.c_ubyte * pages)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        resident += sum(byte & 1 for byte in vector)
        total += pages
        mapping.close()
    return resident / total if total else 0.0


def warm_page_cache(path: str) -> None:
    """Read every file under ``path`` once (untimed), so that every loader meets a warm page
    cache whatever its saver did (statevault writes past the page cache with O_DIRECT)."""
    scratch = bytearray(IO_CHUNK)
    for name in files_under(path):
        fd = os.open(name, os.O_RDONLY)
        try:
            while os.readv(fd, [scratch]):
                pass
        finally:
            os.close(fd)


def h2d_targets(buffer: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A pinned host buffer and a device buffer of ``buffer``'s size, both allocated now."""
    pinned = torch.empty(buffer.numel(), dtype=torch.uint8, pin_memory=True)
    pinned.copy_(buffer)
    return pinned, torch.empty(buffer.numel(), dtype=torch.uint8, device=device)


def read_h2d_floor(path: str, pinned: torch.Tensor, target: torch.Tensor) -> float:
    """Seconds to read the raw file into pinned memory and copy it to the device buffer."""
    started = time.perf_counter()
    read_floor(path, pinned)
    target.copy_(pinned, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - started


def copy_targets(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Preallocated host buffers for ``tensors`` (pinned for device tensors), pages faulted in."""
    targets = []
    for tensor in tensors:
        pinned = tensor.device.type == "cuda"
        target = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
        target.fill_(0)  # fault the pages in now, not inside the timing
        targets.append(target)
    return targets


def copy_floor(tensors: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    """Seconds to copy every tensor into its preallocated target.

    CPU: a plain single-threaded memcpy per tensor (``numpy.copyto`` of the bytes), the floor
    whatever the machine's load; CUDA: non-blocking D2H copies into pinned buffers, one sync.
    """
    if any(t.device.type == "cuda" for t in tensors):
        return _d2h_copy(tensors, targets)
    pairs = [
        (_bytes(target), _bytes(tensor)) for tensor, target in zip(tensors, targets, strict=True)
    ]
    started = time.perf_counter()
    for target, source in pairs:
        np.copyto(target, source)
    return time.perf_counter() - started


def torch_copy(tensors: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    """Seconds for ``target.copy_(tensor)`` per tensor (torch's intra-op threads): reference."""
    started = time.perf_counter()
    with torch.no_grad():
        for tensor, target in zip(tensors, targets, strict=True):
            target.copy_(tensor)
    return time.perf_counter() - started


def fault_in(nbytes: int) -> float:
    """Seconds to allocate ``nbytes`` of fresh host memory and touch every page: reference.

    What any load into freshly allocated tensors pays on top of the read floor.
    """
    started = time.perf_counter()
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    buffer[::4096].fill_(0)
    elapsed = time.perf_counter() - started
    del buffer
    return elapsed


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _d2h_copy(tensors: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.no_grad():
        for tensor, target in zip(tensors, targets, strict=True):
            target.copy_(tensor, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - started


def _bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


# ---- memory -----------------------------------------------------------------------------------


def rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every ``interval`` s in a thread; ``extra`` = peak - baseline."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-rss")

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.baseline)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())
