"""A real S3 protocol server for the tests: moto in server mode on a loopback port.

The tests talk to it through s3fs (and so botocore) exactly as a user talks to a bucket: the
only differences are the endpoint URL and dummy credentials, both given as fsspec
``storage_options``. Pieces:

:class:`MotoS3Server`
    moto's ``ThreadedMotoServer`` on ``127.0.0.1`` and a free port, request logging silenced, with
    a count of requests in progress (:meth:`MotoS3Server.wait_idle`: after a client is killed,
    the requests it had already sent may still be applied; the tests wait for them).
:class:`S3Bucket`
    A fresh bucket: its ``s3://`` URL, the storage options that reach it, and an s3fs filesystem
    to inspect it that caches neither instances nor listings (so it sees what the server holds,
    as another process would).
:class:`FaultProxy`
    A TCP proxy in front of the server that can drop a connection in the middle of the body of
    an upload, as a flaky network does; what the S3 client does next (retry or fail) is the
    client's own behaviour, unpatched.
:func:`record_s3_calls`
    Records every S3 API call made in this process (at aiobotocore's ``_make_api_call``, under
    s3fs's own retry loop), and can make chosen calls fail: fault injection and byte counting
    that work whichever s3fs entry point (``open``, ``pipe``, ``cat_file``...) the code uses.

Run as a script it is the saver that tests/test_remote_storage.py SIGKILLs::

    python tests/s3_server.py kill-child STORAGE_OPTIONS_JSON URL SEED

It imports everything and warms up with a tiny save, builds :func:`kill_state` (SEED), prints
``READY``, waits for a line on stdin, prints ``START``, saves the state to URL with
``overwrite=True`` and prints ``DONE``. Lines go out with ``os.write``: nothing waits in a buffer
when the process dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

ACCESS_KEY = "statevault-test-key-AKIA0TEST"  # distinctive: a test checks they leak nowhere
SECRET_KEY = "statevault-test-secret-9f3e7c1d"
REGION = "us-east-1"
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


class _InFlight:
    """WSGI middleware counting requests the server is applying right now."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.active = 0
        self.last_change = time.monotonic()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        with self.lock:
            self.active += 1
            self.last_change = time.monotonic()
        try:
            return self.app(environ, start_response)
        finally:
            with self.lock:
                self.active -= 1
                self.last_change = time.monotonic()


class S3ServerUnavailable(RuntimeError):
    """moto's server mode is not installed."""


class MotoS3Server:
    """moto's S3 server on a loopback port, for one test session."""

    def __init__(self) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:  # fail loudly: CI installs it, a silent skip would hide S3
            raise S3ServerUnavailable(
                "the S3 tests need moto's server mode: pip install 'moto[server]' s3fs "
                "(or the statevault[test,s3] extras)"
            ) from exc
        for name in ("werkzeug", "moto"):  # one log line per request otherwise
            logging.getLogger(name).setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        self._in_flight: _InFlight | None = None
        wsgi = getattr(self._server, "_server", None)  # werkzeug's server, where moto keeps it
        if wsgi is not None and hasattr(wsgi, "app"):
            self._in_flight = _InFlight(wsgi.app)
            wsgi.app = self._in_flight

    def stop(self) -> None:
        self._server.stop()

    def storage_options(self, endpoint_url: str | None = None) -> dict[str, Any]:
        """fsspec storage options that reach this server (or ``endpoint_url``, e.g. a proxy)."""
        return {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {
                "endpoint_url": endpoint_url or self.endpoint_url,
                "region_name": REGION,
            },
        }

    def filesystem(self) -> Any:
        """An s3fs filesystem for inspection: no instance cache, no listings cache."""
        import s3fs

        return s3fs.S3FileSystem(
            skip_instance_cache=True, use_listings_cache=False, **self.storage_options()
        )

    def new_bucket(self) -> S3Bucket:
        fs = self.filesystem()
        name = f"sv-test-{uuid.uuid4().hex[:16]}"
        fs.call_s3("create_bucket", Bucket=name)  # fs.mkdir would send a region constraint
        return S3Bucket(f"s3://{name}", self.storage_options(), fs)

    def wait_idle(self, quiet_s: float = 0.15, timeout_s: float = 10.0) -> None:
        """Return once no request has been in progress for ``quiet_s`` seconds."""
        if self._in_flight is None:  # moto changed its internals: a fixed grace period
            time.sleep(1.0)
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._in_flight.lock:
                idle = self._in_flight.active == 0
                quiet = time.monotonic() - self._in_flight.last_change
            if idle and quiet >= quiet_s:
                return
            time.sleep(0.02)
        raise TimeoutError(f"the S3 server was still busy after {timeout_s} s")


class S3Bucket(NamedTuple):
    """A fresh bucket: ``url`` is ``s3://<name>``; ``fs`` inspects it without caches."""

    url: str
    storage_options: dict[str, Any]
    fs: Any

    def pending_multipart_uploads(self) -> list[str]:
        """Keys of multipart uploads begun and neither completed nor aborted (billed storage)."""
        listing = self.fs.call_s3("list_multipart_uploads", Bucket=self.url.split("://", 1)[1])
        return [upload["Key"] for upload in listing.get("Uploads", [])]

    def delete(self) -> None:
        """Best effort: free the server's memory (objects, then the bucket)."""
        with contextlib.suppress(Exception):
            self.fs.rm(self.url, recursive=True)


# ---------------------------------------------------------------------------------------------
# Looking at what the server holds
# ---------------------------------------------------------------------------------------------


def objects_under(fs: Any, prefix: str) -> dict[str, int]:
    """Every object under ``prefix/`` as {name relative to the prefix: size}."""
    fs.invalidate_cache()
    root = fs._strip_protocol(prefix).rstrip("/") + "/"
    found = fs.find(root, detail=True)
    assert all(path.startswith(root) for path in found), (root, list(found))
    return {path[len(root) :]: info["size"] for path, info in found.items()}


def manifest_body(fs: Any, prefix: str) -> dict[str, Any]:
    """The parsed body of ``prefix/manifest.json`` (raises FileNotFoundError without one)."""
    fs.invalidate_cache()
    body: dict[str, Any] = json.loads(fs.cat_file(f"{prefix}/{MANIFEST}"))["body"]
    return body


def has_manifest(fs: Any, prefix: str) -> bool:
    fs.invalidate_cache()
    return bool(fs.exists(f"{prefix}/{MANIFEST}"))


def shard_names(body: dict[str, Any]) -> list[str]:
    return [entry["name"] for entry in body["files"]]


# ---------------------------------------------------------------------------------------------
# Recording S3 calls and injecting faults into them
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class S3Call:
    operation: str  # botocore's name: "UploadPart", "PutObject", "GetObject", ...
    key: str
    range: str | None  # the Range header of a GetObject
    content_length: int | None  # bytes the server sent back (GetObject)
    failed: BaseException | None = None


@dataclasses.dataclass
class CallLog:
    calls: list[S3Call] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def of(self, operation: str) -> list[S3Call]:
        with self.lock:
            return [call for call in self.calls if call.operation == operation]

    def operations(self) -> list[str]:
        with self.lock:
            return [call.operation for call in self.calls]


# fail(operation, api_params, number of earlier calls of that operation) -> exception or None
FaultRule = Callable[[str, dict[str, Any], int], BaseException | None]


@contextlib.contextmanager
def record_s3_calls(fail: FaultRule | None = None) -> Iterator[CallLog]:
    """Record every S3 API call in this process; ``fail`` may turn a call into an exception.

    Patched at aiobotocore's ``AioBaseClient._make_api_call``: every s3fs path ends there, the
    call is seen once per attempt of s3fs's retry loop, and an exception raised here reaches s3fs
    exactly as a failed request would (botocore's own HTTP retries happen further down).
    """
    from aiobotocore.client import AioBaseClient

    original = AioBaseClient._make_api_call
    log = CallLog()
    seen: dict[str, int] = {}

    async def make_api_call(self: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
        call = S3Call(operation_name, str(api_params.get("Key", "")), api_params.get("Range"), None)
        with log.lock:
            count = seen.get(operation_name, 0)
            seen[operation_name] = count + 1
            log.calls.append(call)
        error = fail(operation_name, api_params, count) if fail is not None else None
        if error is not None:
            call.failed = error
            raise error
        response = await original(self, operation_name, api_params)
        if operation_name == "GetObject":
            call.content_length = int(response.get("ContentLength", 0))
        return response

    AioBaseClient._make_api_call = make_api_call  # type: ignore[method-assign]
    try:
        yield log
    finally:
        AioBaseClient._make_api_call = original  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------
# A proxy that drops connections mid-upload
# ---------------------------------------------------------------------------------------------


class FaultProxy:
    """Forwards TCP connections to ``target``; drops chosen uploads half-way through their body.

    ``drop(method, target, content_length, index)`` is asked for every request (``index``
    counts the requests seen so far); when it returns True the proxy forwards the headers and
    half the body, then closes both connections, so the client sees its connection reset while
    sending. Only plain HTTP/1.1 with Content-Length bodies is parsed (what botocore sends); a
    chunked request is forwarded untouched to the end of the connection.
    """

    def __init__(self, target: str, drop: Callable[[str, str, int, int], bool]) -> None:
        host, port = target.split("://", 1)[-1].rsplit(":", 1)
        self._target = (host, int(port))
        self._drop = drop
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str, int]] = []
        self.dropped: list[tuple[str, str, int]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self._target)
        except OSError:
            client.close()
            return
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        try:
            self._forward_requests(client, upstream)
        except OSError:
            pass
        finally:
            _close(client, upstream)

    def _forward_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                chunk = client.recv(1 << 16)
                if not chunk:
                    return
                buffer += chunk
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            head += b"\r\n\r\n"
            lines = head.decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ")[:2]
            headers = {
                k.strip().lower(): v.strip()
                for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
            }
            if "chunked" in headers.get("transfer-encoding", "").lower():
                upstream.sendall(head + buffer)
                _pump(client, upstream)
                return
            length = int(headers.get("content-length", "0"))
            with self._lock:
                index = len(self.requests)
                self.requests.append((method, target, length))
                drop = self._drop(method, target, length, index)
                if drop:
                    self.dropped.append((method, target, length))
            upstream.sendall(head)
            to_send = length // 2 if drop else length
            while to_send > 0:
                if not buffer:
                    buffer = client.recv(1 << 16)
                    if not buffer:
                        return
                piece, buffer = buffer[:to_send], buffer[to_send:]
                upstream.sendall(piece)
                to_send -= len(piece)
            if drop:
                return  # _serve closes both ends: the client sees a reset mid-body


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            chunk = source.recv(1 << 16)
            if not chunk:
                break
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        _close(source, sink)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()


# ---------------------------------------------------------------------------------------------
# The killed saver
# ---------------------------------------------------------------------------------------------

KILL_STATE_MIB = 24


def kill_state(seed: int) -> dict[str, Any]:
    """The state the killed saver writes: every byte a function of ``seed``."""
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(seed)
    big = torch.randn(KILL_STATE_MIB << 18, generator=generator)  # float32: 4 B each
    return {
        "seed": seed,
        "big": big.reshape(-1, 1024),
        "small": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "table": np.random.default_rng(seed).integers(0, 1 << 40, size=(64, 64)),
        "note": f"state {seed}",
    }


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def _kill_child(storage_options_json: str, url: str, seed: int) -> None:
    import statevault as sv

    storage_options = json.loads(storage_options_json)
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    warmup = f"s3://{bucket}/warmup-{seed}-{os.getpid()}"
    sv.save({"x": 1}, warmup, storage_options=storage_options)  # first-call costs paid here
    state = kill_state(seed)
    _say("READY")
    sys.stdin.readline()
    _say("START")
    sv.save(state, url, overwrite=True, storage_options=storage_options)
    _say("DONE")


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "kill-child":
        sys.exit(__doc__)
    _kill_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
