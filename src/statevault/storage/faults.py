"""Storage faults as one typed error: :class:`~statevault.errors.StorageError`.

Whatever holds the bytes may refuse: a full, read-only or forbidden local disk, an object store
that cannot be reached, that does not answer, that finds no credentials, denies access or has no
such bucket. Each of these becomes a ``StorageError`` (a ``CheckpointError`` and an ``OSError``)
whose message names the path or URL and says what to do, with the original error chained as
``__cause__`` and its ``errno`` kept. Example::

    with typed_storage_errors(path):
        os.write(fd, data)

Left as they are, because callers rely on them: every ``CheckpointError`` (a ``StorageError``
raised already included), ``FileNotFoundError`` (except a missing bucket), ``FileExistsError``,
and any error that is no storage fault (a symlink refused with ELOOP, a ``ValueError``...).

Client errors are matched by class name and error code, so that this module imports no client
library (botocore, google-auth...): it is imported by every save.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from statevault.errors import CheckpointError, StorageError

__all__ = ["storage_error", "typed_storage_errors"]

_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_READ_ONLY = frozenset({errno.EROFS})
_DENIED = frozenset({errno.EACCES, errno.EPERM})
_UNREACHABLE = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
    }
)
_SLOW = frozenset({errno.ETIMEDOUT})
_BROKEN = frozenset({errno.EIO, errno.ESTALE, errno.EMFILE, errno.ENFILE})

# Client exceptions by class name (botocore, aiohttp, google-auth, azure): what they mean.
_UNREACHABLE_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ProxyConnectionError",
        "ConnectionClosedError",
        "SSLError",
        "ClientConnectorError",
        "ServerDisconnectedError",
    }
)
_SLOW_NAMES = frozenset({"ConnectTimeoutError", "ReadTimeoutError", "ServerTimeoutError"})
_CREDENTIAL_NAMES = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "NoAuthTokenError",
        "TokenRetrievalError",
        "SSOTokenLoadError",
        "DefaultCredentialsError",
        "RefreshError",
        "ClientAuthenticationError",
    }
)
# S3 error codes (botocore ClientError, or s3fs's translation of it) that no retry fixes.
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden"})
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
    }
)
_NO_BUCKET_CODES = frozenset({"NoSuchBucket"})
_FULL_CODES = frozenset({"QuotaExceeded", "StorageFull", "InsufficientStorage"})

_CREDENTIALS_FIX = (
    "give credentials through storage_options (key=, secret=, or profile=) or the environment "
    "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role), or pass "
    "anon=True for a public bucket"
)


def storage_error(exc: BaseException, where: str) -> StorageError | None:
    """The ``StorageError`` that ``exc``, raised while using ``where``, stands for; None when
    ``exc`` is no storage fault or must stay as it is (see the module docstring). The caller
    raises it ``from exc``."""
    if isinstance(exc, (CheckpointError, FileExistsError)):
        return None
    message = _client_message(exc, where)
    if message is None and isinstance(exc, OSError):
        message = _os_message(exc, where)
    if message is None:
        return None
    error = StorageError(message)
    error.errno = getattr(exc, "errno", None)  # callers may test it (ENOSPC, EINVAL...)
    return error


@contextmanager
def typed_storage_errors(where: str) -> Iterator[None]:
    """Run the block; a storage fault it raises becomes a ``StorageError`` naming ``where``
    (a path or URL), raised ``from`` the original error. Everything else passes unchanged."""
    try:
        yield
    except Exception as exc:
        typed = storage_error(exc, where)
        if typed is None:
            raise
        raise typed from exc


def _client_message(exc: BaseException, where: str) -> str | None:
    """What a client library's exception means, by its class name and S3 error code."""
    names = {kind.__name__ for kind in type(exc).__mro__}
    code = _error_code(exc)
    if names & _CREDENTIAL_NAMES or code in _CREDENTIAL_CODES:
        return f"{where}: no valid credentials for the store ({exc}); {_CREDENTIALS_FIX}"
    if code in _NO_BUCKET_CODES or (
        isinstance(exc, OSError) and "bucket does not exist" in str(exc).lower()
    ):
        return f"{where}: the bucket does not exist ({exc}); create it, or fix the URL"
    if code in _DENIED_CODES:
        return _denied(exc, where)
    if code in _FULL_CODES:
        return (
            f"{where}: the store refused the write for good ({exc}); free space or raise the quota"
        )
    if names & _SLOW_NAMES:
        return _slow(exc, where)
    if names & _UNREACHABLE_NAMES:
        return _unreachable(exc, where)
    if "ClientError" in names:  # any other refusal the client did not translate
        return f"{where}: the store refused the request ({exc})"
    return None


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError, or of s3fs's translation (its cause)."""
    for candidate in (exc, exc.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if isinstance(code, str):
                return code
    return None


def _os_message(exc: OSError, where: str) -> str | None:
    if isinstance(exc, FileNotFoundError):
        return None  # callers rely on it; a missing bucket was recognised above
    code = exc.errno
    if code in _SPACE:
        return (
            f"{where}: no space left on the device, or the disk quota is exceeded ({exc}); "
            "free space, raise the quota, or save elsewhere"
        )
    if code in _READ_ONLY:
        return f"{where}: the filesystem is read-only ({exc}); save to a writable path"
    if isinstance(exc, PermissionError) or code in _DENIED:
        return _denied(exc, where)
    if isinstance(exc, TimeoutError) or code in _SLOW:
        return _slow(exc, where)
    if isinstance(exc, ConnectionError) or code in _UNREACHABLE:
        return _unreachable(exc, where)
    if code in _BROKEN or code is None:  # an I/O error, or a client's OSError without errno
        return f"{where}: the storage failed ({exc}); retry later, or check the device or store"
    return None  # ELOOP, ENOTDIR, EISDIR, EINVAL...: the caller's to interpret


def _denied(exc: BaseException, where: str) -> str:
    return (
        f"{where}: access denied ({exc}); check the permission on the path, or the "
        "credentials and bucket policy given through storage_options or the environment"
    )


def _slow(exc: BaseException, where: str) -> str:
    return (
        f"{where}: the storage did not answer in time ({exc}), after the client's retries; "
        "check the endpoint and the network, or raise the timeouts in storage_options "
        "(config_kwargs=)"
    )


def _unreachable(exc: BaseException, where: str) -> str:
    return (
        f"{where}: cannot reach the storage endpoint, or the connection broke ({exc}), after "
        "the client's retries; check the endpoint_url, the network and any proxy"
    )
