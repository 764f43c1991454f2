"""Names inside a run directory.

<run>/run.json                       run metadata and lineage (manager/run.py)
<run>/.statevault.lock               the writer lock (manager/lock.py); on an object store the
                                     lease object (manager/lease.py)
<run>/step_000001000/                a committed checkpoint (manifest.json inside)
<run>/step_000001000.tmp-<id>/       a save in flight, or the leftover of a dead one (local; on
                                     an object store a save writes under step_N/, manifest last)
<run>/step_000001000.corrupt-<id>/   a corrupt checkpoint moved aside, kept for inspection
"""

from __future__ import annotations

import re

from statevault.manager.options import as_step

RUN_FILE = "run.json"
LOCK_FILE = ".statevault.lock"
ANNOTATIONS_FILE = "annotations.json"
_STEP = re.compile(r"^step_(\d{9,19})$")
_TEMPORARY = re.compile(r"^step_\d{9,19}\.tmp-[0-9a-f]+(-old)?$")


def step_dir_name(step: int) -> str:
    return f"step_{as_step(step):09d}"


def parse_step(name: str) -> int | None:
    """The step a checkpoint directory name stands for, or None for any other name."""
    match = _STEP.match(name)
    return int(match.group(1)) if match else None


def is_temporary_name(name: str) -> bool:
    return _TEMPORARY.match(name) is not None
