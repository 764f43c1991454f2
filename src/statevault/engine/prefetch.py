"""Fetch the byte ranges a resharding load will read from an object store, in few requests.

A load into another layout reads, for every tensor, the spans of its stored chunks that overlap
this rank's piece (``engine/regions.py``). From an object store each span would be a request of
its own: a round trip per tensor chunk, one after the other. When the spans are known before the
first read (:meth:`RegionReader.prefetch`, in the order they will be read), they are planned
like the reader's whole-tensor loads: per file, in offset order, ranges at most ``GAP_BYTES``
apart are merged into requests of at most ``REQUEST_BYTES``, and ``REQUESTS_IN_FLIGHT``
background threads fetch them in the order the load will first want them while it consumes
them. A request's bytes are dropped once every span planned in it has been served. The fetchers
stay at most ``WINDOW_BYTES`` ahead of what is still held; a span whose request is not fetched
yet when it is needed is fetched by the reader itself, so the window bounds memory without ever
blocking the load.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

REQUEST_BYTES = 64 << 20
GAP_BYTES = 1 << 20
REQUESTS_IN_FLIGHT = 4
WINDOW_BYTES = 4 * REQUEST_BYTES

# Fetches bytes [offset, offset + size) of a file: (file, offset, size) -> bytes.
Fetch = Callable[[str, int, int], "bytes | bytearray | memoryview"]


@dataclass
class _Request:
    file: str
    start: int
    stop: int
    spans: int = 0  # planned spans not served yet
    data: bytes | bytearray | memoryview | None = None
    error: BaseException | None = None
    claimed: bool = False  # a thread is fetching it (or has)
    done: threading.Event = field(default_factory=threading.Event)


def plan(
    ranges: Sequence[tuple[str, int, int]], request_bytes: int, gap_bytes: int
) -> list[_Request]:
    """Requests covering the (file, start, stop) ranges: per file in offset order, neighbours at
    most ``gap_bytes`` apart merged while a request stays within ``request_bytes``. A range longer
    than ``request_bytes`` is left out (it is read on its own, straight into its destination)."""
    requests: list[_Request] = []
    current: _Request | None = None
    for file, start, stop in sorted(set(ranges)):
        if stop - start > request_bytes or stop <= start:
            continue
        if (
            current is None
            or current.file != file
            or start - current.stop > gap_bytes
            or max(stop, current.stop) - current.start > request_bytes
        ):
            current = _Request(file, start, stop)
            requests.append(current)
        current.stop = max(current.stop, stop)
    return requests


class Prefetcher:
    """Serves planned ranges from merged requests fetched ahead in background threads."""

    def __init__(
        self,
        ranges: Sequence[tuple[str, int, int]],
        fetch: Fetch,
        request_bytes: int = REQUEST_BYTES,
        gap_bytes: int = GAP_BYTES,
        in_flight: int = REQUESTS_IN_FLIGHT,
        window_bytes: int = WINDOW_BYTES,
    ) -> None:
        self._fetch = fetch
        self._requests = plan(ranges, request_bytes, gap_bytes)
        starts: dict[str, list[int]] = {}
        by_file: dict[str, list[_Request]] = {}
        for request in self._requests:
            by_file.setdefault(request.file, []).append(request)
            starts.setdefault(request.file, []).append(request.start)
        # Exactly the planned ranges are served from requests (each use counted), so that a
        # request is dropped only once everything it was fetched for has been read.
        self._planned: dict[tuple[str, int, int], _Request] = {}
        first_use: dict[int, int] = {}  # id(request) -> the first range (in reading order) in it
        for order, (file, start, stop) in enumerate(ranges):
            position = bisect.bisect_right(starts.get(file, []), start) - 1
            if position < 0:
                continue
            request = by_file[file][position]
            if stop <= request.stop and stop > start:
                self._planned[(file, start, stop)] = request
                request.spans += 1
                first_use.setdefault(id(request), order)
        # Fetched in the order the reads will want them (``ranges`` comes in reading order).
        self._requests.sort(key=lambda r: first_use.get(id(r), len(ranges)))
        self._window = window_bytes
        self._held = 0  # bytes fetched and not yet dropped
        self._next = 0  # the next request in plan order for the background fetchers
        self._closed = False
        self._lock = threading.Condition()
        self._threads = [
            threading.Thread(target=self._fetch_ahead, name=f"statevault-prefetch-{i}", daemon=True)
            for i in range(min(in_flight, len(self._requests)))
        ]
        for thread in self._threads:
            thread.start()

    @property
    def request_count(self) -> int:
        return len(self._requests)

    def read(self, file: str, start: int, out: memoryview) -> bool:
        """Fill ``out`` with the planned range [start, start + len(out)) of ``file`` from its
        request (fetching it now if no fetcher has yet); False for a range not planned, or
        already served as often as planned: the caller reads it itself."""
        request = self._planned.get((file, start, start + len(out)))
        if request is None:
            return False
        self._ensure(request)
        if request.error is not None:
            raise request.error
        with self._lock:
            data = request.data
            if data is None:
                return False
            request.spans -= 1
            if request.spans <= 0:
                self._held -= request.stop - request.start
                request.data = None  # every range it was fetched for is served (this one next)
                self._lock.notify_all()
        low = start - request.start
        out[:] = memoryview(data)[low : low + len(out)]
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for request in self._requests:
                request.data = None
            self._lock.notify_all()
        for thread in self._threads:
            thread.join()

    def _ensure(self, request: _Request) -> None:
        with self._lock:
            mine = not request.claimed
            request.claimed = True
        if mine:
            self._load(request)
        request.done.wait()

    def _load(self, request: _Request) -> None:
        try:
            data = self._fetch(request.file, request.start, request.stop - request.start)
            if len(data) != request.stop - request.start:
                raise EOFError(f"{request.file} ended before byte {request.stop}")
        except BaseException as exc:  # handed to every reader of this request
            request.error = exc
        else:
            with self._lock:
                if not self._closed and request.spans > 0:
                    request.data = data
                    self._held += request.stop - request.start
        finally:
            request.done.set()

    def _fetch_ahead(self) -> None:
        while True:
            with self._lock:
                while not self._closed and self._held >= self._window:
                    self._lock.wait()
                if self._closed or self._next >= len(self._requests):
                    return
                request = self._requests[self._next]
                self._next += 1
                if request.claimed:
                    continue
                request.claimed = True
            self._load(request)
