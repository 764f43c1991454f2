"""Run metadata and lineage, in ``<run>/run.json``.

Records who created the run and with what (user config, host, git commit, library and framework
versions), and one entry per session (each process that opened the manager): when, where, and
which checkpoint it resumed from, or which other run it was forked from.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import uuid
from typing import Any

from statevault.checkpoint.info import framework_versions
from statevault.errors import CheckpointError
from statevault.format import tree
from statevault.manager.naming import RUN_FILE
from statevault.storage.local import fsync_dir
from statevault.storage.location import Location


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def git_state(cwd: str | None = None) -> dict[str, Any] | None:
    """The commit (and whether the tree is dirty) of the repository the program runs in."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def read_run(directory: str | Location) -> dict[str, Any] | None:
    try:
        if isinstance(directory, Location) and not directory.local:
            target = directory.join(RUN_FILE)
            size = directory.storage.size(target.path)
            data = directory.storage.read_bytes(target.path, 0, min(size, 16 << 20))
        else:
            path = directory.path if isinstance(directory, Location) else directory
            with open(os.path.join(path, RUN_FILE), "rb") as handle:
                data = handle.read(16 << 20)
        record = json.loads(data)
    except (OSError, EOFError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def write_run(directory: str | Location, record: dict[str, Any]) -> None:
    """Replace run.json atomically (write aside, fsync, rename, fsync the directory; on an
    object store one PUT, which is atomic)."""
    if isinstance(directory, Location):
        if not directory.local:
            data = json.dumps(record, indent=1, allow_nan=False).encode()
            directory.storage.write_bytes(directory.join(RUN_FILE).path, data)
            return
        directory = directory.path
    path = os.path.join(directory, RUN_FILE)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as handle:
        handle.write(json.dumps(record, indent=1, allow_nan=False).encode())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)


def new_run(directory: str | Location, name: str | None, config: Any) -> dict[str, Any]:
    default = directory.name if isinstance(directory, Location) else None
    return {
        "run_id": uuid.uuid4().hex,
        "name": name or default or os.path.basename(os.path.abspath(str(directory))),
        "created": now_iso(),
        "config": tree.encode(config, _reject_arrays, "run_metadata"),
        "sessions": [],
    }


def new_session() -> dict[str, Any]:
    return {
        "started": now_iso(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "git": git_state(),
        "versions": framework_versions(),
        "resumed_from": None,
        "forked_from": None,
    }


def decoded_config(record: dict[str, Any]) -> Any:
    try:
        return tree.decode(record.get("config"), lambda i: None, "run.json")
    except CheckpointError:
        return None


def _reject_arrays(value: Any, path: str) -> None:
    return None
