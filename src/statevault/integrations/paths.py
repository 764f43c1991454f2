"""Deleting and sweeping checkpoints at paths a framework chose, by statevault's rules: only what
statevault provably wrote is deleted (its manifest or its save marker), a committed checkpoint
stops being one in a single atomic step before its files go, and a leftover of a save is swept
only once its writer is provably dead (same host, pid gone). Example::

    remove_checkpoint(resolve("ckpt/epoch=0-step=10.ckpt"))   # True: deleted (or absent)
    sweep_dead_saves("ckpt")                                   # names of leftovers removed
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import warnings

from statevault.checkpoint import commit
from statevault.format.names import marker_name
from statevault.storage.local import LocalStorage
from statevault.storage.location import Location

logger = logging.getLogger("statevault")
_TEMPORARY = re.compile(r"^(?P<name>.+)\.tmp-[0-9a-f]{12}(?P<old>-old)?$")
_MARKER_LIMIT = 4096


def remove_checkpoint(target: Location) -> bool:
    """Delete the statevault checkpoint at ``target``; True when it is gone (or was absent).

    A symbolic link is unlinked (what it points to stays). Anything statevault did not write
    is left alone with a warning, and False is returned."""
    if target.local and os.path.islink(target.path):
        os.unlink(target.path)
        return True
    owner = commit.ownership(target)
    if owner == "absent":
        return True
    if owner != "ours":
        warnings.warn(
            f"statevault: not deleting {target.url}: it was not written by statevault "
            f"({owner}); delete it yourself if it is no longer needed",
            stacklevel=3,
        )
        return False
    if target.local and commit.is_committed(target.path):
        commit.delete_committed(target.path)
    else:
        commit.remove_checkpoint(target)
    return True


def sweep_dead_saves(directory: str) -> list[str]:
    """Remove, in the local ``directory``, the temporaries of statevault saves whose writer
    died (this host, pid gone), and put back an old checkpoint that an overwrite set aside
    when it died between its two renames. Returns the names removed or restored."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    done = []
    for name in names:
        match = _TEMPORARY.match(name)
        path = os.path.join(directory, name)
        if match is None or os.path.islink(path) or not os.path.isdir(path):
            continue
        if not _writer_is_dead(path):
            continue
        original = os.path.join(directory, match.group("name"))
        if match.group("old") and commit.is_committed(path) and not os.path.exists(original):
            os.rename(path, original)  # the only copy of that checkpoint: put it back
        else:
            commit.remove_checkpoint(Location(LocalStorage(), path, path))
        logger.info("statevault: swept %s, left by a save that died", path)
        done.append(name)
    return done


def _writer_is_dead(path: str) -> bool:
    """Whether the save that wrote the temporary ``path`` provably died: its marker names this
    host and a pid that no longer runs."""
    try:
        with open(os.path.join(path, marker_name()), "rb") as handle:
            record = json.loads(handle.read(_MARKER_LIMIT))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("writer") != "statevault":
        return False
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or type(pid) is not int or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
