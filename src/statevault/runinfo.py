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
    plan: SavePlan, timings: Mapping[str, float], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    total_bytes = plan.total_bytes
    seconds = sum(timings.values())
    info: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "created_unix": time.time(),
        "versions": framework_versions(),
        "world_size": 1,
        "save": {
            "bytes": total_bytes,
            "tensors": len(plan.leaves),
            **{k: round(v, 6) for k, v in timings.items()},
            "total_s": round(seconds, 6),
            "throughput_gib_s": round(total_bytes / seconds / 2**30, 3) if seconds > 0 else None,
        },
    }
    if extra:
        info.update(extra)
    return info
