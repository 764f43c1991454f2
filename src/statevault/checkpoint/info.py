"""What a manifest records about the save that made it: when, with which versions, how fast."""

from __future__ import annotations

import datetime
import platform
import sys
import time
from collections.abc import Mapping
from typing import Any

from statevault._version import __version__
from statevault.engine.plan import SavePlan


def framework_versions() -> dict[str, str]:
    """Versions of python, statevault and of each framework already imported by the program."""
    versions = {"python": platform.python_version(), "statevault": __version__}
    for name in ("numpy", "torch", "tensorflow", "keras"):
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None)
        if isinstance(version, str):
            versions[name] = version
    return versions


def checkpoint_info(
    plan: SavePlan,
    timings: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
    started: float | None = None,
    mode: str = "sync",
) -> dict[str, Any]:
    """The manifest's ``info``: creation time, versions and the save's own figures.

    ``save`` holds: mode ("sync": the caller was blocked until the commit; "async": only for
    blocked_s), bytes, tensors, prepare_s / stage_s (planning, host copies), blocked_s (how
    long the caller was blocked), write_s (shards written and fsynced), total_s (from the call
    to the manifest; the commit rename follows), write_gib_s (payload bytes / write_s).
    """
    total_bytes = plan.total_bytes
    write_s = timings.get("write_s", 0.0)
    figures: dict[str, Any] = {"mode": mode, "bytes": total_bytes, "tensors": len(plan.leaves)}
    figures.update({k: round(v, 6) for k, v in timings.items()})
    if started is not None:
        figures["total_s"] = round(time.perf_counter() - started, 6)
    figures["write_gib_s"] = round(total_bytes / write_s / 2**30, 3) if write_s > 0 else None
    info: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "created_unix": time.time(),
        "versions": framework_versions(),
        "world_size": 1,
        "save": figures,
    }
    if extra:
        info.update(extra)
    return info
