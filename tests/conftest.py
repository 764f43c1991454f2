"""Shared test configuration: hypothesis profiles sized for a 2-core machine, and the S3 server
fixtures (``s3``: moto on a loopback port for the session; ``s3_bucket``: a fresh bucket)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.s3_server import MotoS3Server, S3Bucket, S3ServerUnavailable

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# ---------------------------------------------------------------------------------------------
# S3: a real S3 protocol server (moto's server mode) on a loopback port, for the whole session
# ---------------------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "s3: talks to the session's local S3 server (moto)")


@pytest.fixture(scope="session")
def s3() -> Iterator[MotoS3Server]:
    """The session's S3 server. Fails (never skips) when moto is missing: CI installs it."""
    try:
        server = MotoS3Server()
    except S3ServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3: MotoS3Server) -> Iterator[S3Bucket]:
    """A fresh, empty bucket: (url "s3://<name>", storage_options, uncached s3fs filesystem)."""
    bucket = s3.new_bucket()
    try:
        yield bucket
    finally:
        bucket.delete()


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh root in fsspec's in-process ``memory://`` store, removed afterwards."""
    import uuid

    import fsspec

    root = f"memory://sv-test-{uuid.uuid4().hex[:12]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)
