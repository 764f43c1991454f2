"""What the run commands (``ls``, ``rm``, ``gc``) share, read from disk without a manager.

- what a path is: a checkpoint, a run directory, or a root holding run directories;
- a run's header (``run.json``: name, config, sessions, lineage) and its one-line summary;
- retention flags turned into the manager's policies;
- a progress bar shown only where someone watches (a terminal, not ``--json``).

Everything here reads manifests and small JSON files, never tensor payload. The run's rules are
the manager's, never re-implemented here: who holds a run (manager/holder.py), what is
garbage (manager/leftovers.py), how a checkpoint is deleted (RunDir.remove) and why retention
keeps a checkpoint (manager/retention.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rich.console import Console
from rich.progress import Progress

from statevault.errors import CheckpointError
from statevault.format.manifest import ENVELOPE_PREFIX
from statevault.format.names import MANIFEST_NAME
from statevault.manager.index import CheckpointRecord, RunScan, scan_run
from statevault.manager.naming import LOCK_FILE, RUN_FILE, is_temporary_name, parse_step
from statevault.manager.retention import (
    KeepBest,
    KeepEveryNSteps,
    KeepLatest,
    RetentionPolicy,
)
from statevault.manager.run import decoded_config, read_run
from statevault.storage.location import Location

PathKind = Literal["checkpoint", "run", "root"]
Mode = Literal["min", "max"]

# More items than this and a long step gets a progress bar.
HANDFUL = 8
# A committed checkpoint moved aside by the manager (CheckpointManager._make_room).
CORRUPT_ASIDE = re.compile(r"^step_\d{9,19}\.corrupt-[0-9a-f]+$")


# ---- what a path is ---------------------------------------------------------------------------


def is_checkpoint_dir(path: str) -> bool:
    """A real directory whose manifest.json is a statevault manifest (valid or damaged)."""
    manifest = os.path.join(path, MANIFEST_NAME)
    if os.path.islink(path) or not os.path.isdir(path) or os.path.islink(manifest):
        return False
    try:
        with open(manifest, "rb") as handle:
            return handle.read(len(ENVELOPE_PREFIX)) == ENVELOPE_PREFIX
    except OSError:
        return False


def is_run_dir(path: str) -> bool:
    """A directory holding run.json, the writer lock, or any ``step_*`` directory."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    names = os.listdir(path)
    if RUN_FILE in names or LOCK_FILE in names:
        return True
    return any(parse_step(name) is not None or is_temporary_name(name) for name in names)


def is_run_member_name(name: str) -> bool:
    """A name a run directory may hold for a checkpoint: step, temporary or set-aside."""
    return (
        parse_step(name) is not None
        or is_temporary_name(name)
        or CORRUPT_ASIDE.match(name) is not None
    )


def run_dirs(root: str) -> list[str]:
    """The run directories directly inside ``root``, by name."""
    if os.path.islink(root) or not os.path.isdir(root):
        return []
    children = (os.path.join(root, name) for name in sorted(os.listdir(root)))
    return [child for child in children if is_run_dir(child)]


def classify(path: str) -> PathKind | None:
    if is_checkpoint_dir(path):
        return "checkpoint"
    if is_run_dir(path):
        return "run"
    if run_dirs(path):
        return "root"
    return None


def corrupt_aside_names(run: str) -> list[str]:
    return sorted(name for name in os.listdir(run) if CORRUPT_ASIDE.match(name))


def disk_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (symlinks not followed); 0 if it vanished."""
    if not os.path.isdir(path) or os.path.islink(path):
        with contextlib.suppress(OSError):
            return os.lstat(path).st_size
        return 0
    total = 0
    for parent, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


def scan_stable(run: str) -> RunScan:
    """scan_run, minus checkpoints a live manager deleted while we read (not corrupt: gone)."""
    scan = scan_run(run)
    for step, record in list(scan.records.items()):
        if record.status != "committed" and not os.path.lexists(record.path):
            del scan.records[step]
    return scan


def short_problem(record: CheckpointRecord, limit: int = 80) -> str:
    """A record's problem without the leading ``<path>: ``, cut to ``limit`` characters."""
    return shorten((record.problem or "").removeprefix(f"{record.path}: "), limit)


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- the run header ---------------------------------------------------------------------------


@dataclass
class RunHeader:
    """What ``run.json`` says about a run (every field checked: the file is untrusted)."""

    path: str
    name: str
    run_id: str | None
    created: str | None
    config: Any
    sessions: list[dict[str, Any]]

    @property
    def last_session(self) -> dict[str, Any] | None:
        return self.sessions[-1] if self.sessions else None

    def lineage(self) -> list[dict[str, Any]]:
        """One entry per session that resumed or forked: ``{"session", "started", ...}``."""
        entries = []
        for number, session in enumerate(self.sessions, start=1):
            for key in ("resumed_from", "forked_from"):
                origin = session.get(key)
                if isinstance(origin, dict):
                    entries.append(
                        {"session": number, "started": session.get("started"), key: origin}
                    )
        return entries


def read_header(run: str, location: Location | None = None) -> RunHeader:
    """``run.json`` of a local run (or of ``location``, a run at a URL, shown as ``run``)."""
    record = read_run(location if location is not None else run)
    name = location.name if location is not None else os.path.basename(os.path.abspath(run))
    if record is None:
        return RunHeader(run, name, None, None, None, [])
    sessions = record.get("sessions")
    return RunHeader(
        path=run,
        name=_str_or(record.get("name"), name),
        run_id=record["run_id"],
        created=_str_or(record.get("created"), None),
        config=decoded_config(record),
        sessions=[s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else [],
    )


def _str_or(value: Any, default: str | None) -> Any:
    return value if isinstance(value, str) else default


def git_commit(session: Mapping[str, Any]) -> str | None:
    """``"1a2b3c4d5e6f (dirty)"`` from a session's git record, or None."""
    git = session.get("git")
    git = git if isinstance(git, dict) else {}
    commit = git.get("commit")
    if not isinstance(commit, str):
        return None
    return commit[:12] + (" (dirty)" if git.get("dirty") is True else "")


# ---- one line per run -------------------------------------------------------------------------


@dataclass
class Best:
    metric: str
    mode: Mode
    value: float
    step: int


@dataclass
class RunSummary:
    name: str
    path: str
    run_id: str | None
    checkpoints: int
    latest_step: int | None
    best: Best | None
    last_updated: str | None
    damaged: int  # corrupt or incomplete step directories


def summarise_run(run: str, metric: str | None, mode: Mode) -> RunSummary:
    header = read_header(run)
    scan = scan_stable(run)
    committed = scan.committed()
    latest = committed[-1] if committed else None
    return RunSummary(
        name=header.name,
        path=run,
        run_id=header.run_id,
        checkpoints=len(committed),
        latest_step=latest.step if latest else None,
        best=best_of(committed, metric or first_metric(latest), mode),
        last_updated=last_updated(header, latest),
        damaged=sum(1 for r in scan.records.values() if r.status != "committed"),
    )


def first_metric(record: CheckpointRecord | None) -> str | None:
    """The first numeric metric of ``record`` (the default of ``ls --metric``)."""
    if record is None:
        return None
    return next((name for name in record.metrics if KeepBest(name).has(record)), None)


def best_of(records: Sequence[CheckpointRecord], metric: str | None, mode: Mode) -> Best | None:
    if metric is None:
        return None
    policy = KeepBest(metric, mode)
    scored = [(policy.score(r.metrics[metric]), r.step, r) for r in records if policy.has(r)]
    if not scored:
        return None
    _, step, record = min(scored, key=lambda item: (item[0], item[1]))
    return Best(metric, mode, float(record.metrics[metric]), step)


def last_updated(header: RunHeader, latest: CheckpointRecord | None) -> str | None:
    """The newest of: the run's creation, its last session's start, its latest checkpoint."""
    last = header.last_session or {}
    stamps = [header.created, last.get("started"), latest.created if latest else None]
    parsed = [(t, when) for when in stamps if (t := _parse_time(when)) is not None]
    return max(parsed)[1] if parsed else None


def _parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


# ---- retention flags --------------------------------------------------------------------------


def add_retention_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("retention (the run's own policy is not stored on disk)")
    group.add_argument(
        "--keep-last",
        "--max-to-keep",
        dest="keep_last",
        type=_positive,
        metavar="N",
        help="keep the newest N checkpoints (the newest one is always kept)",
    )
    group.add_argument(
        "--keep-every",
        dest="keep_every",
        type=_positive,
        metavar="N",
        help="keep every checkpoint whose step is a multiple of N",
    )
    group.add_argument("--best-metric", metavar="M", help="keep the best checkpoints by metric M")
    group.add_argument("--best-mode", choices=("min", "max"), default="min", help="default: min")
    group.add_argument(
        "--keep-best",
        type=_positive,
        default=None,
        metavar="K",
        help="how many best checkpoints to keep (default 1; needs --best-metric)",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class UsageError(CheckpointError):
    """A command line that cannot be carried out as given (exits 2 with its message)."""


def policies_from_args(args: argparse.Namespace) -> list[RetentionPolicy]:
    """The policies the retention flags describe; UsageError for an inconsistent set."""
    if args.keep_best is not None and args.best_metric is None:
        raise UsageError("--keep-best needs --best-metric")
    policies: list[RetentionPolicy] = []
    if args.keep_last is not None:
        policies.append(KeepLatest(args.keep_last))
    if args.keep_every is not None:
        policies.append(KeepEveryNSteps(args.keep_every))
    if args.best_metric is not None:
        policies.append(KeepBest(args.best_metric, args.best_mode, args.keep_best or 1))
    return policies


def describe_policies(policies: Sequence[RetentionPolicy]) -> str:
    """``"latest 3, every 1000 steps, best 2 by loss (min)"``; ``"—"`` without policies."""
    words = []
    for policy in policies:
        if isinstance(policy, KeepLatest):
            words.append(f"latest {policy.count}")
        elif isinstance(policy, KeepEveryNSteps):
            words.append(f"every {policy.interval} steps")
        elif isinstance(policy, KeepBest):
            words.append(f"best {policy.count} by {policy.metric} ({policy.mode})")
        else:
            words.append(repr(policy))
    return ", ".join(words) or "—"


# ---- progress ---------------------------------------------------------------------------------


@contextlib.contextmanager
def progress(
    console: Console, description: str, total: float, *, enabled: bool
) -> Iterator[Callable[[float], None]]:
    """Yields ``advance(amount)``; draws a bar only when ``enabled`` and on a terminal."""
    show = enabled and console.is_terminal
    with Progress(console=console, transient=True, disable=not show) as bar:
        task = bar.add_task(description, total=total)
        yield lambda amount: bar.advance(task, amount)
