"""Output helpers shared by the subcommands: consoles, human units, safe text, plain JSON.

Everything shown comes from a checkpoint and is hostile until escaped: :func:`printable` turns
control characters (terminal escape sequences included) into visible ``\\x1b`` escapes, and text
reaches rich as :class:`~rich.text.Text`, never as markup.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

# Width used when stdout is not a terminal (a pipe, a file, a test): wide enough that tables
# keep every key path whole on one line instead of wrapping or truncating it.
PIPE_WIDTH = 1_000_000
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


class _Console(Console):
    """A rich console that lets a closed pipe surface as BrokenPipeError (rich would exit 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError("stdout was closed before the output was written")


def make_console(stream: TextIO | None = None) -> Console:
    """A console on ``stream`` (default stdout): colours on a terminal, no wrapping elsewhere."""
    console = _Console(
        file=stream if stream is not None else sys.stdout,
        markup=False,
        emoji=False,
        highlight=False,
    )
    if not console.is_terminal:
        console.width = PIPE_WIDTH
        console.soft_wrap = True
    return console


def error_console() -> Console:
    return make_console(sys.stderr)


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\u202e``, ...)."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def human_bytes(count: int) -> str:
    """``1536`` -> ``'1.5 KiB'``; bytes are exact below 1 KiB."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    """``0.0123`` -> ``'12.3 ms'``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def format_shape(shape: Sequence[int]) -> str:
    """``(2, 3)`` -> ``'[2, 3]'``; a scalar is ``'[]'``."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def text(value: str, style: str = "") -> Text:
    """Hostile text made safe for rich (escaped, never parsed as markup)."""
    return Text(printable(value), style=style)


def to_json_value(value: Any) -> Any:
    """A decoded value as strict JSON (the conversions are lossy and documented here).

    tuple -> array; dict keys -> str(key) when not str; bytes -> base64 text; complex ->
    ``[re, im]``; a non-finite float -> ``"nan"``, ``"inf"`` or ``"-inf"``; a numpy scalar -> its
    python value; anything else -> ``str(value)``.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, complex):
        return [to_json_value(value.real), to_json_value(value.imag)]
    if hasattr(value, "item"):
        return to_json_value(value.item())
    return str(value)


def emit_json(document: Any, stream: TextIO | None = None) -> None:
    """Write ``document`` as one strict, ASCII-only JSON document and a newline."""
    out = stream if stream is not None else sys.stdout
    out.write(json.dumps(to_json_value(document), indent=2, ensure_ascii=True, allow_nan=False))
    out.write("\n")
    out.flush()
