"""``statevault ls PATH``: the checkpoints of a run, or the runs under a directory.

Over a run directory: the run's header (name, id, config, sessions, lineage), one row per
checkpoint directory (step, created, size, bytes the save wrote and shared with the
checkpoint before it, metrics with later annotations, the save's timings,
status: committed / corrupt and why / incomplete, and why retention keeps it) and the
temporaries found (a save in flight, or the leftover of a dead one). A run's retention policy
lives in its training script, not on disk: ``--keep-last/--keep-every/--best-metric`` say which
policy to judge the checkpoints by; without them "kept because" is ``—``.

Over a directory of runs: one row per run (name, path, checkpoints, latest step, best value of
``--metric`` (default: the first metric of the latest checkpoint) by ``--mode``, last update).

Only manifests and small JSON files are read, never tensor payload, and the run's writer lock
is never taken: ``ls`` works beside a live training job. ``--json`` prints one document::

    run:  {"kind": "run", "path", "run": {"name", "run_id", "created", "config", "sessions",
           "last_session": {"started", "host", "pid", "git"} | null,
           "lineage": [{"session", "started", "resumed_from" | "forked_from": {...}}]},
           "writer": {"host", "pid"} | null,  (a live manager holding the run)
           "retention": str | null,  (the policy given by flags)
           "checkpoints": [{"step", "path", "status", "problem", "created", "bytes" (on disk),
                            "metrics", "save": {"mode", "bytes", "blocked_s", "write_s",
                            "total_s", "write_gib_s", "bytes_written", "bytes_shared"},
                            "kept_because": [str] | null}],  ([]: the policy would delete it)
           "temporaries": [{"name", "path", "kind", "state", "bytes"}]}
    root: {"kind": "root", "path", "metric", "mode",
           "runs": [{"name", "path", "run_id", "checkpoints", "latest_step", "best": {"metric",
                     "mode", "value", "step"} | null, "last_updated", "damaged"}]}
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console, JustifyMethod, RenderableType
from rich.pretty import Pretty
from rich.table import Table
from rich.text import Text

from statevault.checkpoint import local_path
from statevault.cli import render, runs
from statevault.cli.common import (
    ExitCode,
    add_command,
    add_json_flag,
    add_storage_options,
    is_url,
)
from statevault.cli.ls_cells import (
    NONE,
    kept_text,
    metrics_text,
    number,
    save_text,
    short_time,
    written_text,
)
from statevault.errors import CheckpointNotFoundError
from statevault.manager.holder import Holder, live_holder
from statevault.manager.index import CheckpointRecord, RunScan
from statevault.manager.leftovers import RUN_FILE_TEMPORARY
from statevault.manager.naming import parse_step
from statevault.manager.retention import retention_reasons
from statevault.storage.location import resolve

if TYPE_CHECKING:
    from statevault.cli.common import Subparsers

SAVE_TIMINGS = (
    "mode",
    "bytes",
    "blocked_s",
    "write_s",
    "total_s",
    "write_gib_s",
    "bytes_written",
    "bytes_shared",
)


def register(subparsers: Subparsers) -> None:
    parser = add_command(
        subparsers,
        "ls",
        summary="list a run's checkpoints, or the runs under a directory (manifests only)",
        description=(
            "List the checkpoints of a run directory (step, time, size, metrics, save timings, "
            "status, why kept), or the runs under a directory. Never takes the run's lock: "
            "safe beside a live training job."
        ),
        handler=run,
    )
    parser.add_argument("path", metavar="PATH", help="a run directory, or a directory of runs")
    parser.add_argument(
        "--metric", help="runs: the metric whose best value is shown (default: the first one)"
    )
    parser.add_argument("--mode", choices=("min", "max"), default="min", help="runs: best is min")
    runs.add_retention_arguments(parser)
    add_storage_options(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    if is_url(args.path):
        return show_document(run_document(read_remote_view(args)), show_run, args)
    path = local_path(args.path)
    if not os.path.isdir(path):  # say so, rather than that no run was found in it
        problem = "is not a directory" if os.path.lexists(path) else "does not exist"
        hint = "give a run directory, or a directory of runs"
        raise CheckpointNotFoundError(f"{path} {problem}: {hint}")
    kind = runs.classify(path)
    if kind == "checkpoint":
        raise runs.UsageError(f"{path} is one checkpoint, not a run: use `statevault inspect`")
    if kind is None:
        raise CheckpointNotFoundError(
            f"no statevault run at {path}: no run.json or step_* directories in it, and no run "
            "directories inside it"
        )
    if kind == "run":
        view = read_view(path, args)
        document = run_document(view)
        show = show_run
    else:
        document = root_document(path, args.metric, args.mode)
        show = show_root
    return show_document(document, show, args)


def show_document(
    document: dict[str, Any],
    show: Callable[[Console, dict[str, Any]], None],
    args: argparse.Namespace,
) -> int:
    if args.json:
        render.emit_json(document)
    else:
        show(render.make_console(), document)
    return ExitCode.OK


# ---- one run ----------------------------------------------------------------------------------


@dataclass
class RunView:
    header: runs.RunHeader
    scan: RunScan
    kept: dict[int, list[str]] | None  # None: no policy given
    retention: str | None
    writer: Holder | None


def read_view(path: str, args: argparse.Namespace) -> RunView:
    policies = runs.policies_from_args(args)
    header = runs.read_header(path)
    scan = runs.scan_stable(path)
    kept = retention_reasons(scan, header.run_id, policies)[0] if policies else None
    retention = runs.describe_policies(policies) if policies else None
    return RunView(header, scan, kept, retention, live_holder(resolve(path)))


def read_remote_view(args: argparse.Namespace) -> RunView:
    """The view of a run at a URL (see cli/remote_runs.py)."""
    from statevault.cli import remote_runs

    run = remote_runs.open_run(args.path, args)
    policies = runs.policies_from_args(args)
    header = runs.read_header(run.url, run)
    scan = remote_runs.scan(run)
    kept = retention_reasons(scan, header.run_id, policies)[0] if policies else None
    retention = runs.describe_policies(policies) if policies else None
    return RunView(header, scan, kept, retention, live_holder(run))


def run_document(view: RunView) -> dict[str, Any]:
    records = sorted(view.scan.records.values(), key=lambda r: r.step)
    return {
        "kind": "run",
        "path": view.header.path,
        "run": header_document(view.header),
        "writer": {"host": view.writer.host, "pid": view.writer.pid} if view.writer else None,
        "retention": view.retention,
        "checkpoints": [checkpoint_document(r, view.kept) for r in records],
        "temporaries": temporaries(view),
    }


def header_document(header: runs.RunHeader) -> dict[str, Any]:
    last = header.last_session
    return {
        "name": header.name,
        "run_id": header.run_id,
        "created": header.created,
        "config": header.config,
        "sessions": len(header.sessions),
        "last_session": {k: last.get(k) for k in ("started", "host", "pid", "git")}
        if last
        else None,
        "lineage": header.lineage(),
    }


def checkpoint_document(
    record: CheckpointRecord, kept: dict[int, list[str]] | None
) -> dict[str, Any]:
    committed = record.status == "committed"
    return {
        "step": record.step,
        "path": record.path,
        "status": record.status,
        "problem": runs.short_problem(record, limit=400) if record.problem else None,
        "created": record.created,
        "bytes": record.total_bytes if is_url(record.path) else runs.disk_bytes(record.path),
        "metrics": record.metrics,
        "save": {key: record.save.get(key) for key in SAVE_TIMINGS},
        "kept_because": kept.get(record.step, []) if committed and kept is not None else None,
    }


def temporaries(view: RunView) -> list[dict[str, Any]]:
    run = view.header.path
    if is_url(run):  # an object store: saves write in place, nothing is set aside
        return []
    state = "in flight" if view.writer is not None else "leftover of an interrupted save"
    rows = [(name, "temporary", state) for name in view.scan.temporaries]
    rows += [
        (name, "set-aside", "old copy of a replaced checkpoint") for name in view.scan.set_aside
    ]
    rows += [
        (name, "corrupt-aside", "damaged checkpoint moved aside for inspection")
        for name in runs.corrupt_aside_names(run)
    ]
    rows += [
        (name, "temporary", "leftover of an interrupted run.json update")
        for name in sorted(os.listdir(run))
        if RUN_FILE_TEMPORARY.match(name)
    ]
    return [
        {
            "name": name,
            "path": os.path.join(run, name),
            "kind": kind,
            "state": state,
            "bytes": runs.disk_bytes(os.path.join(run, name)),
        }
        for name, kind, state in sorted(rows, key=lambda row: _order(row[0]))
    ]


def _order(name: str) -> tuple[int, str]:
    step = parse_step(name.split(".", 1)[0])
    return (step if step is not None else -1, name)


def show_run(console: Console, document: dict[str, Any]) -> None:
    console.print(run_header_grid(document))
    console.print()
    if document["checkpoints"]:
        console.print(checkpoint_table(document["checkpoints"]))
    else:
        console.print(render.text("No checkpoints yet."))
    if document["temporaries"]:
        console.print()
        console.print(temporaries_table(document["temporaries"]))


def run_header_grid(document: dict[str, Any]) -> Table:
    run, writer = document["run"], document["writer"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("Run", render.text(str(run["name"])))
    grid.add_row("Path", render.text(document["path"]))
    grid.add_row("Run id", render.text(run["run_id"] or "— (no run.json)"))
    grid.add_row("Created", render.text(run["created"] or NONE))
    grid.add_row("Config", Pretty(run["config"]) if run["config"] is not None else Text(NONE))
    grid.add_row("Sessions", render.text(sessions_line(run)))
    for i, entry in enumerate(run["lineage"]):
        grid.add_row("Lineage" if i == 0 else "", render.text(lineage_line(entry)))
    grid.add_row(
        "Writer",
        render.text(f"pid {writer['pid']} on {writer['host']} (live)" if writer else "none"),
    )
    grid.add_row(
        "Retention",
        render.text(
            document["retention"]
            or "not stored on disk; pass --keep-last/--keep-every/--best-metric to judge"
        ),
    )
    return grid


def sessions_line(run: dict[str, Any]) -> str:
    last = run["last_session"]
    if not last:
        return str(run["sessions"])
    commit = runs.git_commit(last)
    where = f"last on {last.get('host')} at {last.get('started')}"
    return f"{run['sessions']} ({where}" + (f", git {commit})" if commit else ")")


def lineage_line(entry: dict[str, Any]) -> str:
    prefix = f"session {entry['session']}: "
    if "resumed_from" in entry:
        return prefix + f"resumed from step {entry['resumed_from'].get('step')}"
    origin = entry["forked_from"]
    return prefix + (
        f"forked from {origin.get('path')} step {origin.get('step')} "
        f"(run {origin.get('run_id') or 'unknown'})"
    )


def checkpoint_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("Step", justify="right", no_wrap=True)
    table.add_column("Created", no_wrap=True)
    table.add_column("Size", justify="right", no_wrap=True)
    table.add_column("Written / shared", justify="right", no_wrap=True)
    for name in ("Metrics", "Save", "Status", "Kept because"):
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(
            str(row["step"]),
            render.text(short_time(row["created"])),
            render.human_bytes(row["bytes"]),
            render.text(written_text(row["save"])),
            render.text(metrics_text(row["metrics"])),
            render.text(save_text(row["save"])),
            status_text(row),
            kept_text(row["kept_because"]),
        )
    return table


def status_text(row: dict[str, Any]) -> RenderableType:
    status = row["status"]
    if status == "committed":
        return render.text(status, "green")
    detail = runs.shorten(row["problem"] or "", 48)
    return render.text(f"{status}: {detail}" if detail else status, "bold red")


def temporaries_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Temporaries", box=None, header_style="bold", pad_edge=False)
    table.add_column("Name", overflow="fold")
    table.add_column("Kind")
    table.add_column("State", overflow="fold")
    table.add_column("Size", justify="right")
    for row in rows:
        table.add_row(
            render.text(row["name"]),
            render.text(row["kind"]),
            render.text(row["state"]),
            render.human_bytes(row["bytes"]),
        )
    return table


# ---- a directory of runs ----------------------------------------------------------------------


def root_document(root: str, metric: str | None, mode: runs.Mode) -> dict[str, Any]:
    summaries = [runs.summarise_run(path, metric, mode) for path in runs.run_dirs(root)]
    return {
        "kind": "root",
        "path": root,
        "metric": metric,
        "mode": mode,
        "runs": [asdict(summary) for summary in summaries],
    }


def show_root(console: Console, document: dict[str, Any]) -> None:
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns: list[tuple[str, JustifyMethod]] = [
        ("Name", "left"),
        ("Path", "left"),
        ("Checkpoints", "right"),
        ("Latest", "right"),
        ("Best", "left"),
        ("Last updated", "left"),
        ("Damaged", "right"),
    ]
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="fold")
    for row in document["runs"]:
        table.add_row(
            render.text(row["name"]),
            render.text(row["path"]),
            str(row["checkpoints"]),
            str(row["latest_step"]) if row["latest_step"] is not None else NONE,
            render.text(best_text(row["best"])),
            render.text(short_time(row["last_updated"])),
            str(row["damaged"]) if row["damaged"] else "",
        )
    console.print(table)
    console.print(
        render.text(f"{render.plural(len(document['runs']), 'run')} in {document['path']}")
    )


def best_text(best: dict[str, Any] | None) -> str:
    if best is None:
        return NONE
    return f"{best['metric']}={number(best['value'])} ({best['mode']}) at step {best['step']}"
