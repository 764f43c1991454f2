"""``statevault rm PATH...`` / ``statevault rm RUN --step N``: delete checkpoints, safely.

A dry run by default: prints what would be deleted and deletes nothing; ``--yes`` deletes. Each
PATH must be a directory statevault provably wrote: its manifest.json is a statevault manifest
(valid or damaged), or it holds statevault's save marker (a save or a deletion that died), or
it is an empty ``*.tmp-*`` directory of a run; anything else, whatever its name, is refused
(exit 2) before anything is deleted. Deletion removes the manifest
first (``LocalStorage.remove_tree``), so an interrupted ``rm`` never leaves a directory that
looks committed. While a live CheckpointManager holds a run's lock, ``rm`` refuses (exit 2,
naming the holder) unless ``--force``; while it deletes, it holds the lock itself so that no
manager starts meanwhile. ``--json`` prints::

    {"dry_run": bool, "bytes": int, "notes": [str],
     "items": [{"path", "name", "kind", "step", "reason", "bytes", "deleted"}]}

``kind`` is "checkpoint", "corrupt", "incomplete", "temporary", "set-aside" or
"corrupt-aside"; ``gc`` prints the same document with "run" added.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from statevault.checkpoint import local_path, open_checkpoint
from statevault.checkpoint.commit import ownership
from statevault.cli import render, runs
from statevault.cli.common import (
    ExitCode,
    add_command,
    add_json_flag,
    add_storage_options,
    is_url,
)
from statevault.errors import CheckpointError, CheckpointNotFoundError
from statevault.manager.holder import maintenance
from statevault.manager.naming import is_temporary_name, parse_step, step_dir_name
from statevault.manager.rundir import RunDir
from statevault.storage.local import LocalStorage, fsync_dir
from statevault.storage.location import Location, resolve

if TYPE_CHECKING:
    from statevault.cli.common import Subparsers


def register(subparsers: Subparsers) -> None:
    parser = add_command(
        subparsers,
        "rm",
        summary="delete checkpoints (dry run unless --yes)",
        description=(
            "Delete checkpoint directories: each PATH, or the steps of RUN given with --step. "
            "Prints what would be deleted unless --yes. Refuses anything that is not a "
            "statevault checkpoint, and runs held by a live CheckpointManager (unless --force)."
        ),
        handler=run,
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="checkpoint directories, or one RUN with --step"
    )
    parser.add_argument(
        "--step", type=_step, action="append", metavar="N", help="a step of RUN (repeatable)"
    )
    add_destructive_flags(parser)
    add_storage_options(parser)
    add_json_flag(parser)


def _step(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a step number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"steps are non-negative, got {value}")
    return value


def add_destructive_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", "-y", action="store_true", help="delete (default: dry run)")
    parser.add_argument(
        "--force", action="store_true", help="delete even while a live manager holds the run"
    )


def run(args: argparse.Namespace) -> int:
    if any(is_url(path) for path in args.paths):
        from statevault.cli import remote_runs  # it imports this module

        return remote_runs.rm(args)
    targets = step_targets(args.paths, args.step) if args.step else path_targets(args.paths)
    run_dirs = [parent for parent in parents(targets) if runs.is_run_dir(parent)]
    return carry_out(run_dirs, lambda: Found([describe(path) for path in targets]), args)


# ---- what to delete ---------------------------------------------------------------------------


@dataclass
class Deletion:
    """One directory (or leftover file) to delete, and why."""

    path: str
    name: str
    kind: str
    step: int | None
    reason: str
    bytes: int
    deleted: bool = False


def step_targets(paths: Sequence[str], steps: Sequence[int]) -> list[str]:
    if len(paths) != 1:
        raise runs.UsageError("--step takes exactly one RUN directory")
    run_dir = local_path(paths[0])
    if not runs.is_run_dir(run_dir):
        raise CheckpointNotFoundError(f"{run_dir} is not a statevault run directory")
    targets = []
    for step in dict.fromkeys(steps):
        path = os.path.join(run_dir, step_dir_name(step))
        if not os.path.isdir(path) or os.path.islink(path):
            raise CheckpointNotFoundError(f"no checkpoint directory for step {step} in {run_dir}")
        if not deletable(path):
            raise runs.UsageError(
                f"{path} was not written by statevault (no statevault manifest, no save "
                "marker); refusing to delete it"
            )
        targets.append(path)
    return targets


def path_targets(paths: Sequence[str]) -> list[str]:
    """Every path checked before anything is deleted; UsageError for a foreign one."""
    targets = list(dict.fromkeys(local_path(path) for path in paths))
    for path in targets:
        if not os.path.lexists(path):
            raise CheckpointNotFoundError(f"no such directory: {path}")
        if not deletable(path):
            raise runs.UsageError(
                f"{path} is not a statevault checkpoint directory (neither a statevault "
                "manifest nor statevault's save marker is in it); refusing to delete it"
            )
    return targets


def deletable(path: str) -> bool:
    """A directory statevault provably wrote (its manifest or its save marker says so; a
    statevault temporary may also be empty): never anything else, whatever its name."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    owner = ownership(Location(LocalStorage(), path, path))
    if owner == "ours":
        return True
    name = os.path.basename(path)
    return owner == "empty" and is_temporary_name(name) and runs.is_run_dir(os.path.dirname(path))


def describe(path: str) -> Deletion:
    """What ``path`` is, read from its name and manifest."""
    name = os.path.basename(path)
    size = runs.disk_bytes(path)
    step = parse_step(name.split(".", 1)[0])
    if is_temporary_name(name):
        return Deletion(path, name, "temporary", step, "a save in flight or its leftover", size)
    if runs.CORRUPT_ASIDE.match(name):
        return Deletion(path, name, "corrupt-aside", step, "damaged checkpoint set aside", size)
    try:
        open_checkpoint(path)
    except CheckpointNotFoundError:
        return Deletion(path, name, "incomplete", step, "no manifest.json", size)
    except CheckpointError as exc:
        reason = runs.shorten(str(exc).removeprefix(f"{path}: "), 80)
        return Deletion(path, name, "corrupt", step, reason, size)
    return Deletion(path, name, "checkpoint", step, "committed checkpoint", size)


# ---- deleting (shared with gc) ----------------------------------------------------------------


@dataclass
class Found:
    """What a command found to delete, and notes on what it deliberately left alone."""

    items: list[Deletion]
    notes: list[str] = field(default_factory=list)
    run: str | None = None  # gc: the one run looked at (paths are shown relative to it)


def parents(paths: Sequence[str]) -> list[str]:
    return sorted({os.path.dirname(path) for path in paths})


def carry_out(
    run_dirs: Sequence[str],
    find: Callable[[], Found],
    args: argparse.Namespace,
) -> int:
    """Hold the runs' locks (refusing live ones), find, delete unless a dry run, print.

    ``find`` runs under the locks, so that what it finds cannot change before it is deleted.
    """
    console = render.make_console()
    with contextlib.ExitStack() as stack:
        for run_dir in run_dirs:
            stack.enter_context(maintenance(resolve(run_dir), force=args.force))
        found = find()
        if args.yes:
            delete(found.items, console, show_progress=not args.json)
    if args.json:
        render.emit_json({"dry_run": not args.yes, **deletion_document(found)})
    else:
        show(console, found, dry_run=not args.yes)
    return ExitCode.OK


def delete(items: list[Deletion], console: Console, *, show_progress: bool) -> None:
    """Delete each item, manifest first; each parent directory is fsynced once at the end."""
    enabled = show_progress and len(items) > runs.HANDFUL
    with runs.progress(console, "Deleting", len(items), enabled=enabled) as advance:
        for item in items:
            remove(item.path)
            item.deleted = True
            advance(1)
    for parent in parents([item.path for item in items]):
        fsync_dir(parent)


def remove(path: str) -> None:
    """Delete one item by the manager's rule (RunDir.remove): a checkpoint stops being one
    first and keeps its marker to the last, so an interrupted ``rm`` is swept later."""
    parent, name = os.path.split(path)
    RunDir(parent).remove(name)


def deletion_document(found: Found) -> dict[str, Any]:
    run = {"run": found.run} if found.run is not None else {}
    return {
        **run,
        "bytes": sum(item.bytes for item in found.items),
        "items": [asdict(item) for item in found.items],
        "notes": found.notes,
    }


def show(console: Console, found: Found, *, dry_run: bool) -> None:
    items = found.items
    if found.run is not None:
        console.print(render.text(f"Run {found.run}"))
    for note in found.notes:
        console.print(render.text(f"Note: {note}"))
    if not items:
        console.print(render.text("Nothing to delete."))
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("Path", overflow="fold")
    table.add_column("Kind", no_wrap=True)
    table.add_column("Step", justify="right", no_wrap=True)
    table.add_column("Why", overflow="fold")
    table.add_column("Size", justify="right", no_wrap=True)
    for item in items:
        table.add_row(
            render.text(os.path.relpath(item.path, found.run) if found.run else item.path),
            render.text(item.kind),
            str(item.step) if item.step is not None else "",
            render.text(item.reason),
            render.human_bytes(item.bytes),
        )
    console.print(table)
    console.print(render.text(footer(items, dry_run)))


def footer(items: list[Deletion], dry_run: bool) -> str:
    count = render.plural(len(items), "item")
    size = render.human_bytes(sum(item.bytes for item in items))
    if dry_run:
        return f"Dry run: would delete {count}, reclaiming {size}. Pass --yes to delete."
    return f"Deleted {count}, reclaimed {size}."
