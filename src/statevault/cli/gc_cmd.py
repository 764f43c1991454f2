"""``statevault gc RUN``: find a run's garbage, and delete it with ``--yes``.

Garbage is what no reader will ever load and statevault provably wrote (its manifest or its
save marker says so; manager/leftovers.py decides, as for the manager's own sweep):
temporaries (``*.tmp-*``: leftovers of saves that died), incomplete step directories (no
manifest: a crash mid-deletion), and the old copy of a checkpoint that has been replaced since.
Another tool's directories in a run are never deleted: they are listed in the notes.
``--corrupt`` adds corrupt checkpoints (a statevault manifest that does not parse) and the
damaged ones the manager set aside (``*.corrupt-*``): kept by default, for inspection.
``--keep-last N``, ``--keep-every N`` and ``--best-metric M [--best-mode]
[--keep-best K]`` add the run's own committed checkpoints that such a policy would not keep;
the newest committed checkpoint, and checkpoints written by another run, are never deleted.

A dry run by default; ``--yes`` deletes (manifest first). Refuses while a live CheckpointManager
holds the run (exit 2, naming it) unless ``--force``, and holds the run's lock while it looks
and deletes. ``--json`` prints ``rm``'s document with ``"run"`` added::

    {"run": path, "dry_run": bool, "bytes": int, "notes": [str],
     "items": [{"path", "name", "kind", "step", "reason", "bytes", "deleted"}]}
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from statevault.checkpoint import local_path
from statevault.checkpoint.commit import ownership
from statevault.cli import remote_runs, render, rm_cmd, runs
from statevault.cli.common import add_command, add_json_flag, add_storage_options, is_url
from statevault.cli.rm_cmd import Deletion, Found
from statevault.errors import CheckpointNotFoundError
from statevault.manager.index import RunScan, scan_run
from statevault.manager.leftovers import survey
from statevault.manager.naming import parse_step
from statevault.manager.retention import RetentionPolicy, retention_reasons
from statevault.storage.local import LocalStorage
from statevault.storage.location import Location

if TYPE_CHECKING:
    from statevault.cli.common import Subparsers


def register(subparsers: Subparsers) -> None:
    parser = add_command(
        subparsers,
        "gc",
        summary="find a run's garbage (temporaries, incomplete, corrupt); delete with --yes",
        description=(
            "Find what no reader will load in a run directory: leftovers of interrupted saves "
            "and deletions, and with --corrupt damaged checkpoints; with retention flags also "
            "checkpoints outside that policy (never the newest). Dry run unless --yes."
        ),
        handler=run,
    )
    parser.add_argument("run", metavar="RUN", help="a run directory")
    parser.add_argument(
        "--corrupt", action="store_true", help="also corrupt checkpoints and *.corrupt-* dirs"
    )
    runs.add_retention_arguments(parser)
    rm_cmd.add_destructive_flags(parser)
    parser.add_argument(
        "--older-than",
        type=float,
        metavar="SECONDS",
        help="URLs: a step_* prefix without a manifest is garbage once its newest object is "
        "this old (default 3600: a younger one may be a save in flight)",
    )
    add_storage_options(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    if is_url(args.run):
        return remote_runs.gc(args, runs.policies_from_args(args))
    run_dir = local_path(args.run)
    if not runs.is_run_dir(run_dir):
        raise CheckpointNotFoundError(f"{run_dir} is not a statevault run directory")
    policies = runs.policies_from_args(args)
    return rm_cmd.carry_out(
        [run_dir], lambda: find_garbage(run_dir, corrupt=args.corrupt, policies=policies), args
    )


def find_garbage(run_dir: str, *, corrupt: bool, policies: list[RetentionPolicy]) -> Found:
    scan = scan_run(run_dir)
    found = Found([], run=run_dir)
    found.items += leftovers(run_dir, scan, found.notes)
    found.items += damaged(run_dir, scan, corrupt, found.notes)
    if policies:
        found.items += outside_retention(run_dir, scan, policies, found.notes)
    found.items.sort(key=lambda item: (item.step if item.step is not None else -1, item.name))
    return found


def _item(run_dir: str, name: str, kind: str, reason: str) -> Deletion:
    path = os.path.join(run_dir, name)
    step = parse_step(name.split(".", 1)[0])
    return Deletion(path, name, kind, step, reason, runs.disk_bytes(path))


def leftovers(run_dir: str, scan: RunScan, notes: list[str]) -> list[Deletion]:
    """What the manager itself would sweep (manager/leftovers.py): statevault's own leftovers
    of interrupted saves and deletions; what is not provably statevault's is only noted."""
    found = survey(Location(LocalStorage(), run_dir, run_dir), scan)
    notes += [
        f"kept {name}: the only copy of its checkpoint (a manager restores it)"
        for name in found.restore
    ]
    notes += [f"left alone {note}" for note in found.foreign]
    return [_item(run_dir, item.name, item.kind, item.reason) for item in found.garbage]


def damaged(run_dir: str, scan: RunScan, corrupt: bool, notes: list[str]) -> list[Deletion]:
    records = [r for r in scan.records.values() if r.status == "corrupt"]
    aside = [
        name
        for name in runs.corrupt_aside_names(run_dir)
        if ownership(Location(LocalStorage(), os.path.join(run_dir, name), name)) == "ours"
    ]
    if not corrupt:
        if records or aside:
            count = render.plural(len(records) + len(aside), "damaged checkpoint")
            notes.append(f"kept {count} for inspection; pass --corrupt to delete them")
        return []
    items = [
        _item(run_dir, os.path.basename(r.path), "corrupt", runs.short_problem(r)) for r in records
    ]
    items += [
        _item(run_dir, name, "corrupt-aside", "damaged checkpoint set aside by the manager")
        for name in aside
    ]
    return items


def outside_retention(
    run_dir: str, scan: RunScan, policies: list[RetentionPolicy], notes: list[str]
) -> list[Deletion]:
    """The run's own committed checkpoints that ``policies`` would not keep."""
    header = runs.read_header(run_dir)
    if header.run_id is None:
        notes.append("no run.json: cannot tell this run's checkpoints, none deleted by retention")
        return []
    _, deletable = retention_reasons(scan, header.run_id, policies)
    reason = f"outside retention ({runs.describe_policies(policies)})"
    return [
        _item(run_dir, os.path.basename(scan.records[step].path), "checkpoint", reason)
        for step in deletable
    ]
