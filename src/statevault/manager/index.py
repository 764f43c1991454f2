"""What a run directory holds: one record per checkpoint directory, read from its manifest.

A directory ``step_N`` with a manifest that parses is *committed*; one whose manifest does not
parse is *corrupt* (kept, never deleted automatically); one without a manifest but with
statevault's marker is *incomplete* (the leftover of a deletion, or of a save on a store without
rename). Anything else is *foreign* (another tool's, or empty: never touched), and one that
cannot be read (EACCES, ESTALE) is *unreadable* (never touched either: commit.ownership).
Temporaries are listed apart: they are never checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from statevault.checkpoint import open_checkpoint
from statevault.checkpoint.commit import ownership
from statevault.errors import CheckpointError, CheckpointNotFoundError
from statevault.format import tree
from statevault.format.checksum import crc32c_of, format_checksum
from statevault.manager.naming import ANNOTATIONS_FILE, is_temporary_name, parse_step
from statevault.storage.local import LocalStorage
from statevault.storage.location import Location


@dataclass
class CheckpointRecord:
    step: int
    path: str
    status: str  # "committed" | "corrupt" | "incomplete" | "foreign" | "unreadable"
    problem: str | None = None
    run_id: str | None = None
    created: str | None = None
    total_bytes: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: Any = None
    save: dict[str, Any] = field(default_factory=dict)
    kept_because: list[str] = field(default_factory=list)


@dataclass
class RunScan:
    records: dict[int, CheckpointRecord]
    temporaries: list[str]
    set_aside: list[str] = field(default_factory=list)  # old checkpoints of a died overwrite

    def committed(self) -> list[CheckpointRecord]:
        return sorted(
            (r for r in self.records.values() if r.status == "committed"), key=lambda r: r.step
        )


def scan_run(directory: str | Location) -> RunScan:
    """Read every checkpoint directory of a run (manifests only, no payload).

    ``directory``: a local path, or a :class:`Location` (any store: an object-store run lists
    its ``step_*`` prefixes; there a prefix without a manifest is *incomplete*)."""
    if isinstance(directory, Location):
        if not directory.local:
            return _scan_remote(directory)
        directory = directory.path
    records: dict[int, CheckpointRecord] = {}
    temporaries: list[str] = []
    set_aside: list[str] = []
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    for name in names:
        step = parse_step(name)
        path = os.path.join(directory, name)
        if step is not None and os.path.isdir(path) and not os.path.islink(path):
            records[step] = read_record(path, step)
        elif is_temporary_name(name):
            is_old = name.endswith("-old") and os.path.isfile(os.path.join(path, "manifest.json"))
            (set_aside if is_old else temporaries).append(name)
    return RunScan(records, temporaries, set_aside)


def _scan_remote(run: Location) -> RunScan:
    records: dict[int, CheckpointRecord] = {}
    temporaries: list[str] = []
    for name in run.storage.list_dir(run.path):
        step = parse_step(name)
        if step is not None:
            records[step] = read_record(run.join(name), step)
        elif is_temporary_name(name):
            temporaries.append(name)
    return RunScan(records, temporaries)


def read_record(where: str | Location, step: int) -> CheckpointRecord:
    if isinstance(where, Location) and where.local:
        where = where.path
    path = where.url if isinstance(where, Location) else where
    try:
        manifest = open_checkpoint(where, ranks=()).manifest  # no per-rank index: not needed
    except CheckpointNotFoundError:  # no manifest, or deleted between the listing and now
        return _unlisted(where, step, "no manifest.json")
    except CheckpointError as exc:
        return _unlisted(where, step, str(exc), damaged=True)
    info = manifest.info
    record = CheckpointRecord(
        step=step,
        path=path,
        status="committed",
        run_id=info.get("run_id") if isinstance(info.get("run_id"), str) else None,
        created=info.get("created") if isinstance(info.get("created"), str) else None,
        total_bytes=manifest.total_bytes(),
        save=_dict_or_empty(info.get("save")),
    )
    try:
        record.metadata = tree.decode(manifest.metadata, _no_tensors, path)
        metrics = tree.decode(info.get("metrics"), _no_tensors, path)
        record.metrics = dict(metrics) if isinstance(metrics, dict) else {}
    except CheckpointError as exc:
        return CheckpointRecord(step, path, "corrupt", str(exc))
    if info.get("step") != step:
        return CheckpointRecord(step, path, "corrupt", f"manifest says step {info.get('step')}")
    record.metrics.update(read_annotations(where))
    return record


def _unlisted(
    where: str | Location, step: int, problem: str, damaged: bool = False
) -> CheckpointRecord:
    """The record of a step directory that is no checkpoint: whose it is decides its status."""
    location = where if isinstance(where, Location) else Location(LocalStorage(), where, where)
    owner = ownership(location)
    if owner == "ours":
        return CheckpointRecord(step, location.url, "corrupt" if damaged else "incomplete", problem)
    if owner == "unknown":
        return CheckpointRecord(step, location.url, "unreadable", f"cannot be read: {problem}")
    detail = "empty" if owner == "empty" else "not written by statevault (no manifest, no marker)"
    return CheckpointRecord(step, location.url, "foreign", detail)


def _dict_or_empty(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _no_tensors(index: int) -> None:
    raise CheckpointError("metadata cannot hold tensors")


def read_annotations(where: str | Location) -> dict[str, Any]:
    """Metrics attached after the save (``annotate``); a damaged file is ignored, not trusted."""
    try:
        data = read_small(where, ANNOTATIONS_FILE)
        if data is None:
            return {}
        document = json.loads(data)
        body = document["body"]
        expected = format_checksum(crc32c_of(_canonical(body)))
        if document.get("checksum") != expected:
            return {}
        where_text = where.url if isinstance(where, Location) else where
        metrics = tree.decode(body["metrics"], _no_tensors, where_text)
    except (OSError, EOFError, ValueError, KeyError, TypeError, CheckpointError):
        return {}
    return dict(metrics) if isinstance(metrics, dict) else {}


def read_small(where: str | Location, name: str, limit: int = 1 << 20) -> bytes | None:
    """The bytes of a small file ``name`` under a directory or prefix; None when absent."""
    if isinstance(where, Location) and where.local:
        where = where.path
    if isinstance(where, str):
        try:
            with open(os.path.join(where, name), "rb") as handle:
                return handle.read(limit)
        except FileNotFoundError:
            return None
    target = where.join(name)
    try:
        size = where.storage.size(target.path)
        return where.storage.read_bytes(target.path, 0, min(size, limit))
    except FileNotFoundError:
        return None


def annotations_bytes(metrics: dict[str, Any]) -> bytes:
    body = {"metrics": tree.encode(metrics, _reject)}
    document = {"checksum": format_checksum(crc32c_of(_canonical(body))), "body": body}
    return json.dumps(document, indent=1, allow_nan=False).encode()


def _reject(value: Any, path: str) -> None:
    return None


def _canonical(body: Any) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as python values: numpy scalars and 0-d tensors (a loss.item() forgotten) too."""
    plain: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        is_scalar_array = getattr(value, "ndim", None) == 0 and callable(
            getattr(value, "item", None)
        )
        plain[key] = value.item() if is_scalar_array else value
    return plain


def encode_metrics(metrics: Mapping[str, Any] | None) -> Any:
    """Metrics as a tree node; arrays are refused with an error naming the metric."""
    return tree.encode(plain_metrics(metrics), _reject, "metrics")
