"""The cells of ``statevault ls``'s tables: plain text from a checkpoint's recorded info."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from statevault.cli import render

NONE = "—"


def kept_text(reasons: list[str] | None) -> Text:
    if reasons is None:
        return Text(NONE)
    if not reasons:
        return render.text("not kept: the policy would delete it", "yellow")
    return render.text(", ".join(reasons))


def short_time(created: str | None) -> str:
    """``2025-01-02T03:04:05.678+00:00`` -> ``2025-01-02 03:04:05``."""
    return created[:19].replace("T", " ") if created else NONE


def metrics_text(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{name}={number(value)}" for name, value in metrics.items()) or NONE


def number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value) if not isinstance(value, int) else str(value)


def save_text(save: dict[str, Any]) -> str:
    """``sync 12.3 ms, 1.2 GiB/s``; ``async blocked 1.0 ms of 50.2 ms, 1.2 GiB/s``.

    A sync save blocks for its whole duration; an async one only for ``blocked_s``.
    """
    mode = save.get("mode") if isinstance(save.get("mode"), str) else None
    blocked, total = number_or_none(save.get("blocked_s")), number_or_none(save.get("total_s"))
    parts = [mode] if mode else []
    if mode == "async" and blocked is not None and total is not None:
        parts.append(f"blocked {_seconds(blocked)} of {_seconds(total)}")
    elif total is not None:
        parts.append(_seconds(total))
    text = " ".join(parts)
    rate = write_rate(save)
    if rate is not None:
        text += f", {render.human_bytes(int(rate))}/s"
    return text or NONE


def _seconds(value: float) -> str:
    return render.human_seconds(value)


def write_rate(save: dict[str, Any]) -> float | None:
    """Payload bytes per second of writing (exact, where write_gib_s is rounded to 0.001)."""
    size, seconds = number_or_none(save.get("bytes")), number_or_none(save.get("write_s"))
    if size is not None and seconds is not None and seconds > 0:
        return size / seconds
    gib_s = number_or_none(save.get("write_gib_s"))
    return gib_s * 2**30 if gib_s is not None else None


def number_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def written_text(save: dict[str, Any]) -> str:
    """``1.5 MiB / 64.0 MiB``: the bytes this save wrote, and those it shared with the
    checkpoint before it (hard links or server-side copies); ``—`` where not recorded."""
    written = number_or_none(save.get("bytes_written"))
    shared = number_or_none(save.get("bytes_shared"))
    if written is None or shared is None:
        return NONE
    return f"{render.human_bytes(int(written))} / {render.human_bytes(int(shared))}"
