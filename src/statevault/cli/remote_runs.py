"""``ls``, ``rm`` and ``gc`` of a run at a URL (``s3://bucket/run``, ``memory://...``).

The same documents and tables as for a local run, read through the storage protocol. What
differs on an object store (no rename, no flock): the writer is the lease object
(``.statevault.lock``, manager/lease.py); a deletion removes the manifest first, then the
rest; garbage is a ``step_*`` prefix without a manifest whose newest object is older than
``--older-than`` seconds (default one hour: a younger one may be a save in flight), plus the
multipart uploads a killed writer left open (S3). ``rm`` and ``gc`` refuse a run whose lease is
live unless ``--force``; they do not take the lease themselves.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from statevault.cli import render, runs
from statevault.cli.common import ExitCode, storage_options
from statevault.cli.rm_cmd import Deletion, Found, deletion_document, show
from statevault.errors import CheckpointNotFoundError
from statevault.manager.config import DEFAULT_STALE_AFTER_SECONDS
from statevault.manager.holder import refuse_if_held
from statevault.manager.index import RunScan, scan_run
from statevault.manager.leftovers import is_statevault_upload, survey
from statevault.manager.naming import LOCK_FILE, RUN_FILE, parse_step, step_dir_name
from statevault.manager.retention import RetentionPolicy, retention_reasons
from statevault.manager.rundir import RunDir
from statevault.storage.location import Location, resolve


def open_run(url: str, args: argparse.Namespace) -> Location:
    """The run at ``url``; CheckpointNotFoundError when nothing of a run is there."""
    run = resolve(url, storage_options(args))
    names = run.storage.list_dir(run.path)
    if (
        RUN_FILE not in names
        and LOCK_FILE not in names
        and not any(parse_step(name) is not None for name in names)
    ):
        raise CheckpointNotFoundError(f"no statevault run at {run.url}: no run.json or step_*")
    return run


def scan(run: Location) -> RunScan:
    return scan_run(run)


def rm(args: argparse.Namespace) -> int:
    """``rm URL --step N`` or ``rm URL/step_N ...``."""
    if args.step:
        if len(args.paths) != 1:
            raise runs.UsageError("--step takes exactly one RUN")
        run = open_run(args.paths[0], args)
        names = [step_dir_name(step) for step in dict.fromkeys(args.step)]
    else:
        parents = {path.rstrip("/").rsplit("/", 1)[0] for path in args.paths}
        if len(parents) != 1:
            raise runs.UsageError("give checkpoints of one run at a time")
        run = open_run(parents.pop(), args)
        names = [path.rstrip("/").rsplit("/", 1)[1] for path in args.paths]
    records = scan(run).records
    items = []
    for name in names:
        step = parse_step(name)
        record = records.get(step) if step is not None else None
        if record is None:
            raise CheckpointNotFoundError(f"no checkpoint {name} in {run.url}")
        if record.status in ("foreign", "unreadable"):
            raise runs.UsageError(
                f"{record.path} is not provably a statevault checkpoint ({record.problem}); "
                "refusing to delete it"
            )
        why = "committed checkpoint" if record.status == "committed" else record.status
        items.append(Deletion(record.path, name, "checkpoint", step, why, record.total_bytes))
    return carry_out(run, Found(items), args)


def gc(args: argparse.Namespace, policies: list[RetentionPolicy]) -> int:
    run = open_run(args.run, args)
    older_than = args.older_than if args.older_than is not None else DEFAULT_STALE_AFTER_SECONDS
    found = Found([], run=run.url)
    scanned = scan(run)
    records = scanned.records
    leftovers = survey(run, scanned, older_than)  # what the manager itself would sweep
    for item in leftovers.garbage:
        where = run.join(item.name)
        found.items.append(Deletion(where.url, item.name, item.kind, item.step, item.reason, 0))
    found.notes += [f"kept {note}" for note in leftovers.young]
    found.notes += [f"left alone {note}" for note in leftovers.foreign]
    for record in sorted(records.values(), key=lambda r: r.step):
        if record.status != "corrupt":
            continue
        name = record.path.rsplit("/", 1)[1]
        if args.corrupt:
            reason = runs.short_problem(record)
            found.items.append(Deletion(record.path, name, "corrupt", record.step, reason, 0))
        else:
            found.notes.append(f"kept damaged {name} for inspection; --corrupt deletes it")
    if policies:
        header = runs.read_header(run.url, run)
        _, deletable = retention_reasons(RunScan(records, []), header.run_id, policies)
        reason = f"outside retention ({runs.describe_policies(policies)})"
        for step in deletable:
            record = records[step]
            name = record.path.rsplit("/", 1)[1]
            found.items.append(
                Deletion(record.path, name, "checkpoint", step, reason, record.total_bytes)
            )
    return carry_out(run, found, args, abort_uploads_older_than=older_than)


def carry_out(
    run: Location,
    found: Found,
    args: argparse.Namespace,
    abort_uploads_older_than: float | None = None,
) -> int:
    refuse_if_held(run, args.force)
    if args.yes:
        delete(run, found.items)
        abort = getattr(run.storage, "abort_stale_uploads", None)
        if abort_uploads_older_than is not None and callable(abort):
            count = abort(run.path, abort_uploads_older_than, is_statevault_upload)
            if count:
                found.notes.append(f"aborted {count} multipart uploads left open")
    if args.json:
        render.emit_json({"dry_run": not args.yes, **deletion_document(found)})
    else:
        show(render.make_console(), found, dry_run=not args.yes)
    return ExitCode.OK


def delete(run: Location, items: Sequence[Deletion]) -> None:
    """Each prefix by the manager's rule (RunDir.remove: the manifest first, the marker last)."""
    directory = RunDir(run)
    for item in items:
        directory.remove(item.name)
        item.deleted = True
