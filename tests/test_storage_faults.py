"""Storage faults are typed: every way the place that holds the bytes refuses (a full or
read-only disk, a permission, an unreachable endpoint, missing credentials, access denied, no
bucket) raises ``sv.StorageError`` naming the path or URL, saying what to do, with the original
error chained as ``__cause__``. Not-found and already-exists stay what they are (callers rely on
them).

Local faults are injected (the tests run as root, where chmod cannot produce EACCES): the
storage module's ``os`` is replaced by a proxy whose chosen call raises the chosen errno.
S3 faults use the session's moto server (tests/s3_server.py), a closed loopback port, an
environment without credentials, and client errors injected under s3fs.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import botocore.exceptions
import numpy as np
import pytest

import statevault as sv
from statevault.storage import local as local_storage
from statevault.storage.local import LocalStorage
from statevault.storage.location import resolve
from tests.s3_server import REGION, MotoS3Server, S3Bucket, record_s3_calls

# The budget documented in statevault/storage/fsspec_storage.py: when the endpoint refuses
# connections, botocore's 3 attempts sleep at most 1 + 2 s between them.
REFUSED_BOUND_S = 3.0
SLACK_S = 3.0  # the machine is shared: scheduling, imports, the first client's setup


# ---- local disk -------------------------------------------------------------------------------


class _FaultyOs:
    """The ``os`` module, except that ``failing`` raises OSError(``code``) for paths (or file
    descriptors of files) under ``root``."""

    def __init__(self, failing: str, code: int, root: Path) -> None:
        self.failing, self.code, self.root = failing, code, os.fspath(root)
        self.injected: list[OSError] = []
        self.fds: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name == "open":
            return self._open
        if name != self.failing or not callable(real):
            return real
        return lambda *args, **kwargs: self._maybe_fail(real, *args, **kwargs)

    def _open(self, path: str, *args: Any, **kwargs: Any) -> int:
        if self.failing == "open" and os.fspath(path).startswith(self.root):
            self._raise(path)
        fd = os.open(path, *args, **kwargs)
        if os.fspath(path).startswith(self.root):
            self.fds.add(fd)
        return fd

    def _maybe_fail(self, real: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        target = args[0] if args else None
        ours = target in self.fds if isinstance(target, int) else str(target).startswith(self.root)
        if ours:
            self._raise(target)
        return real(*args, **kwargs)

    def _raise(self, target: object) -> None:
        error = OSError(self.code, os.strerror(self.code))
        self.injected.append(error)
        raise error


def _inject(monkeypatch: pytest.MonkeyPatch, failing: str, code: int, root: Path) -> _FaultyOs:
    faulty = _FaultyOs(failing, code, root)
    monkeypatch.setattr(local_storage, "os", faulty)
    return faulty


ADVICE = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space",
    errno.EROFS: "read-only",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
}


def _assert_typed(error: BaseException, where: str, faulty: _FaultyOs) -> None:
    assert isinstance(error, sv.StorageError), repr(error)
    assert isinstance(error, sv.CheckpointError) and isinstance(error, OSError)
    assert where in str(error), f"the message names the path: {error}"
    assert faulty.injected and error.__cause__ is faulty.injected[-1], "the cause is chained"
    assert error.errno == faulty.code, "the errno is kept for callers that test it"
    assert ADVICE[faulty.code] in str(error).lower(), f"the message says what to do: {error}"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_a_failing_write_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    path = os.fspath(tmp_path / "data.bin")
    faulty = _inject(monkeypatch, "write", code, tmp_path)
    handle = LocalStorage().open_write(path)
    with pytest.raises(OSError) as caught:
        handle.write(memoryview(b"payload"))
    handle.abort()
    _assert_typed(caught.value, path, faulty)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EPERM])
def test_a_file_that_cannot_be_created_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    path = os.fspath(tmp_path / "data.bin")
    faulty = _inject(monkeypatch, "open", code, tmp_path)
    with pytest.raises(OSError) as caught:
        LocalStorage().open_write(path)
    _assert_typed(caught.value, path, faulty)


def test_a_full_disk_at_fsync_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS and quota-enforcing filesystems report a full disk when the bytes are flushed."""
    path = os.fspath(tmp_path / "data.bin")
    faulty = _inject(monkeypatch, "fsync", errno.ENOSPC, tmp_path)
    handle = LocalStorage().open_write(path)
    handle.write(memoryview(b"payload"))
    with pytest.raises(OSError) as caught:
        handle.close()
    _assert_typed(caught.value, path, faulty)


def test_a_directory_on_a_read_only_disk_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = os.fspath(tmp_path / "step_000000001.tmp-1234")
    faulty = _inject(monkeypatch, "makedirs", errno.EROFS, tmp_path)
    with pytest.raises(OSError) as caught:
        LocalStorage().make_dir(path)
    _assert_typed(caught.value, path, faulty)


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_small_file_on_a_full_disk_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = os.fspath(tmp_path / "run.json")
    faulty = _inject(monkeypatch, failing, errno.ENOSPC, tmp_path)
    with pytest.raises(OSError) as caught:
        LocalStorage().write_bytes(path, b"{}")
    _assert_typed(caught.value, path, faulty)
    assert os.listdir(tmp_path) == [], "the aside copy is removed"


def test_not_found_and_exists_are_left_as_they_are(tmp_path: Path) -> None:
    storage = LocalStorage()
    with pytest.raises(FileNotFoundError) as missing:
        storage.size(os.fspath(tmp_path / "missing"))
    assert not isinstance(missing.value, sv.StorageError)
    storage.make_dir(os.fspath(tmp_path / "d"))
    with pytest.raises(FileExistsError) as exists:
        storage.make_dir(os.fspath(tmp_path / "d"))
    assert not isinstance(exists.value, sv.StorageError)
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        storage.open_write(os.fspath(tmp_path / "f"))


def test_a_full_disk_during_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ck"
    sv.save({"w": np.arange(1000, dtype=np.float32)}, path)
    faulty = _inject(monkeypatch, "write", errno.ENOSPC, tmp_path)
    with pytest.raises(sv.StorageError) as caught:
        sv.save({"w": np.ones(1000, dtype=np.float32)}, path, overwrite=True)
    monkeypatch.undo()
    assert faulty.injected, "the fault was hit"
    assert os.fspath(tmp_path) in str(caught.value)
    assert caught.value.__cause__ is faulty.injected[0]
    assert sorted(os.listdir(tmp_path)) == ["ck"], "no temporary directory is left behind"
    assert np.array_equal(sv.load(path)["w"], np.arange(1000, dtype=np.float32))
    assert sv.verify(path).ok


# ---- the translation itself -------------------------------------------------------------------


def _client_error(code: str, message: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": message}}, "PutObject"
    )


@pytest.mark.parametrize(
    ("error", "expect"),
    [
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x:1"), "reach"),
        (botocore.exceptions.ConnectTimeoutError(endpoint_url="http://x:1"), "in time"),
        (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x:1"), "in time"),
        (botocore.exceptions.NoCredentialsError(), "credentials"),
        (_client_error("AccessDenied", "Access Denied"), "access denied"),
        (_client_error("InvalidAccessKeyId", "no such key id"), "credentials"),
        (_client_error("NoSuchBucket", "The specified bucket does not exist"), "bucket"),
        (PermissionError("Access Denied"), "access denied"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "reach"),
        (TimeoutError("timed out"), "in time"),
        (OSError(errno.ENOSPC, "No space left on device"), "free space"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only"),
    ],
)
def test_client_and_os_errors_become_storage_errors(error: BaseException, expect: str) -> None:
    from statevault.storage.faults import storage_error, typed_storage_errors

    typed = storage_error(error, "s3://bucket/run/step_1")
    assert isinstance(typed, sv.StorageError)
    assert "s3://bucket/run/step_1" in str(typed)
    assert expect in str(typed).lower(), str(typed)
    with pytest.raises(sv.StorageError) as caught, typed_storage_errors("s3://bucket/run/x"):
        raise error
    assert caught.value.__cause__ is error


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(errno.ENOENT, "gone"),
        FileExistsError(errno.EEXIST, "there"),
        sv.CorruptCheckpointError("bad"),
        sv.StorageError("already typed"),
        OSError(errno.ELOOP, "a symlink"),
        ValueError("not a storage fault"),
        EOFError("short file"),
    ],
)
def test_other_errors_pass_through_unchanged(error: BaseException) -> None:
    from statevault.storage.faults import storage_error, typed_storage_errors

    assert storage_error(error, "/some/path") is None
    with pytest.raises(type(error)) as caught, typed_storage_errors("/some/path"):
        raise error
    assert caught.value is error


# ---- S3 -----------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _unreachable_options() -> dict[str, Any]:
    return {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{_closed_port()}"},
        "skip_instance_cache": True,
    }


@pytest.mark.s3
@pytest.mark.parametrize("operation", ["load", "save"])
def test_an_unreachable_endpoint_fails_within_the_budget(operation: str) -> None:
    url = "s3://sv-unreachable/run/ck"
    options = _unreachable_options()
    started = time.monotonic()
    with pytest.raises(sv.StorageError) as caught:
        if operation == "load":
            sv.load(url, storage_options=options)
        else:
            sv.save({"w": np.ones(4)}, url, storage_options=options)
    elapsed = time.monotonic() - started
    assert url in str(caught.value), str(caught.value)
    assert "endpoint" in str(caught.value)
    assert type(caught.value.__cause__).__name__ == "EndpointConnectionError"
    assert elapsed < REFUSED_BOUND_S + SLACK_S, f"failed after {elapsed:.1f} s"


def test_s3_gets_a_bounded_retry_budget_unless_given_one() -> None:
    from statevault.storage import fsspec_storage

    fs = resolve("s3://b/x", {"key": "k", "secret": "s", "skip_instance_cache": True}).storage
    config = fs.fs.config_kwargs  # type: ignore[attr-defined]
    assert config["connect_timeout"] == fsspec_storage.S3_CONNECT_TIMEOUT_S
    attempts = fsspec_storage.S3_MAX_ATTEMPTS
    assert config["retries"] == {"total_max_attempts": attempts, "mode": "standard"}
    mine = {"connect_timeout": 1, "retries": {"max_attempts": 9}}
    fs = resolve("s3://b/x", {"config_kwargs": mine, "skip_instance_cache": True}).storage
    assert fs.fs.config_kwargs == mine  # type: ignore[attr-defined]
    assert mine == {"connect_timeout": 1, "retries": {"max_attempts": 9}}, "not mutated"


@pytest.mark.s3
def test_missing_credentials_are_a_storage_error(
    s3: MotoS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    (tmp_path / "credentials").write_text("")
    (tmp_path / "config").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.fspath(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", os.fspath(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to look for
    options = {
        "client_kwargs": {"endpoint_url": s3.endpoint_url, "region_name": REGION},
        "skip_instance_cache": True,
    }
    url = "s3://sv-no-credentials/ck"
    with pytest.raises(sv.StorageError) as caught:
        sv.load(url, storage_options=options)
    assert url in str(caught.value)
    assert "credentials" in str(caught.value)
    assert type(caught.value.__cause__).__name__ == "NoCredentialsError"


@pytest.mark.s3
def test_the_cli_reports_missing_credentials_without_a_traceback(
    s3: MotoS3Server, tmp_path: Path
) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    (tmp_path / "empty").write_text("")
    env |= {
        "AWS_SHARED_CREDENTIALS_FILE": os.fspath(tmp_path / "empty"),
        "AWS_CONFIG_FILE": os.fspath(tmp_path / "empty"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_S3": s3.endpoint_url,
        "AWS_DEFAULT_REGION": REGION,
    }
    done = subprocess.run(
        [sys.executable, "-m", "statevault.cli.main", "verify", "s3://sv-no-credentials/ck"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert "credentials" in done.stderr and "s3://sv-no-credentials/ck" in done.stderr
    assert done.returncode not in (0, 3), (done.returncode, done.stderr)


def _fail(operations: tuple[str, ...], code: str, message: str) -> Any:
    def rule(operation: str, params: dict[str, Any], count: int) -> BaseException | None:
        if operation in operations:
            return _client_error(code, message)
        return None

    return rule


@pytest.mark.s3
def test_access_denied_on_load_names_the_url(s3_bucket: S3Bucket) -> None:
    url = f"{s3_bucket.url}/ck"
    sv.save({"w": np.ones(4)}, url, storage_options=s3_bucket.storage_options)
    reads = ("HeadObject", "GetObject", "ListObjectsV2")
    with (
        record_s3_calls(_fail(reads, "AccessDenied", "Access Denied")),
        pytest.raises(sv.StorageError) as caught,
    ):
        sv.load(url, storage_options=s3_bucket.storage_options)
    assert url in str(caught.value) and "access denied" in str(caught.value)
    assert isinstance(caught.value.__cause__, PermissionError)


@pytest.mark.s3
@pytest.mark.parametrize("operation", ["load", "save"])
def test_a_missing_bucket_names_the_url(s3: MotoS3Server, operation: str) -> None:
    url = "s3://sv-no-such-bucket-0815/ck"
    with pytest.raises(sv.StorageError) as caught:
        if operation == "load":
            sv.load(url, storage_options=s3.storage_options())
        else:
            sv.save({"w": np.ones(4)}, url, storage_options=s3.storage_options())
    assert url in str(caught.value) and "bucket does not exist" in str(caught.value)
    assert caught.value.__cause__ is not None
