"""What statevault may sweep from a run: the leftovers of its own dead saves and deletions, and
nothing else. Ownership is proven, never guessed from a name (commit.ownership): a statevault
manifest or a save's marker. Used by the manager when it opens a run and by ``statevault gc``.

A local run (rename protocol; the manager holds the run's flock, so no other save is live):

- ``step_N.tmp-<id>``: a save that died, the old side of an overwrite, or a deletion that died.
  Swept when it is statevault's or empty. An ``-old`` one that holds the only copy of its
  checkpoint (an overwrite died between its two renames) is put back instead;
- ``step_N`` without a manifest but with statevault's marker: a deletion that died. Swept;
- ``run.json.tmp-<id>``: a run.json update that died (manager/run.py writes them). Swept.

An object store (no rename, no flock): a ``step_N`` prefix with statevault's marker and no
manifest, once its newest object is older than ``stale_after_s`` (a younger one may be a save
in flight).

Everything else under the run (another tool's directories, empty ``step_N`` directories, what
cannot be read: EACCES, ESTALE) is listed in ``foreign`` and left alone.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from statevault.checkpoint.commit import TMP_MARKER, ownership
from statevault.format.names import is_shard_name
from statevault.manager.index import RunScan
from statevault.manager.naming import parse_step
from statevault.storage.location import Location

# The leftover of a run.json update that died between its write and its rename (manager/run.py).
RUN_FILE_TEMPORARY = re.compile(r"^run\.json\.tmp-[0-9a-f]+$")


@dataclass
class Leftover:
    """One thing to sweep: a directory (or prefix, or small file) of the run, and why."""

    name: str
    kind: str  # "temporary" | "incomplete" | "set-aside" | "run-file"
    step: int | None
    reason: str


@dataclass
class Survey:
    garbage: list[Leftover] = field(default_factory=list)
    restore: list[str] = field(default_factory=list)  # set-aside copies to put back
    foreign: list[str] = field(default_factory=list)  # not provably ours: a note each
    young: list[str] = field(default_factory=list)  # maybe a save in flight: a note each

    def foreign_note(self) -> str | None:
        """One line naming what was left alone as not statevault's; None when nothing was."""
        if not self.foreign:
            return None
        more = f" and {len(self.foreign) - 5} more" if len(self.foreign) > 5 else ""
        return "left alone, not statevault's: " + "; ".join(self.foreign[:5]) + more


def survey(run: Location, scan: RunScan, stale_after_s: float | None = None) -> Survey:
    """What of ``run`` is statevault's garbage (see the module docstring). ``stale_after_s``:
    on an object store, how old a manifest-less prefix must be (None: any age)."""
    found = Survey()
    for name in scan.temporaries:
        _temporary(run, name, found)
    for name in scan.set_aside:
        original = name.split(TMP_MARKER, 1)[0]
        record = scan.records.get(parse_step(original) or -1)
        if record is not None and record.status == "committed":
            found.garbage.append(_leftover(name, "set-aside", "old copy of a replaced checkpoint"))
        else:
            found.restore.append(name)
    now = time.time()
    for record in sorted(scan.records.values(), key=lambda r: r.step):
        name = record.path.rstrip("/").rsplit("/", 1)[-1]
        if record.status == "incomplete":
            age = _age(run.join(name), now) if not run.local else 0.0
            if age is None:
                continue  # gone since the scan
            if not run.local and stale_after_s is not None and age < stale_after_s:
                found.young.append(
                    f"{name}: no manifest, but written {age:.0f} s ago (a save in flight?); "
                    f"swept once older than {stale_after_s:.0f} s"
                )
                continue
            reason = "no manifest.json: leftover of an interrupted save or deletion"
            found.garbage.append(_leftover(name, "incomplete", reason))
        elif record.status in ("foreign", "unreadable"):
            found.foreign.append(f"{name}: {record.problem}")
    if run.local:
        for name in sorted(os.listdir(run.path)):
            if RUN_FILE_TEMPORARY.match(name):
                reason = "leftover of an interrupted run.json update"
                found.garbage.append(_leftover(name, "run-file", reason))
    return found


def _temporary(run: Location, name: str, found: Survey) -> None:
    owner = ownership(run.join(name))
    if owner in ("ours", "empty"):
        found.garbage.append(_leftover(name, "temporary", "leftover of an interrupted save"))
    elif owner == "foreign":
        found.foreign.append(f"{name}: not written by statevault (no manifest, no marker)")
    elif owner == "unknown":
        found.foreign.append(f"{name}: cannot be read, so not provably statevault's")


def _leftover(name: str, kind: str, reason: str) -> Leftover:
    return Leftover(name, kind, parse_step(name.split(".", 1)[0]), reason)


def _age(prefix: Location, now: float) -> float | None:
    modified = prefix.storage.modified(prefix.path)
    return None if modified is None else now - modified


def is_statevault_upload(key: str) -> bool:
    """Whether an object key relative to the run (``step_N/<name>``) is one a save of
    statevault's writes: only such multipart uploads are aborted when a run is swept."""
    step, _, name = key.partition("/")
    return parse_step(step) is not None and is_shard_name(name)
