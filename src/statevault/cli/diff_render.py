"""What ``statevault diff`` found, and how it is shown: the rows of the comparison, the
``--json`` document (cli/diff_cmd.py documents its shape) and the rich tables."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from statevault.cli import render, runs
from statevault.format.manifest import TensorEntry

TENSOR_STATUSES = ("added", "removed", "shape_changed", "changed", "identical")
VALUE_STATUSES = ("added", "removed", "changed", "identical")
_STYLES = {
    "added": "green",
    "removed": "red",
    "shape_changed": "magenta",
    "changed": "yellow",
    "identical": "dim",
}


@dataclass
class TensorRow:
    path: str
    status: str  # one of TENSOR_STATUSES
    a: TensorEntry | None
    b: TensorEntry | None
    a_index: int | None = None
    b_index: int | None = None
    max_abs: float | None = None
    rel_l2: float | None = None
    note: str | None = None

    @property
    def dtype_changed(self) -> bool:
        return self.a is not None and self.b is not None and self.a.dtype != self.b.dtype


@dataclass
class ValueRow:
    path: str
    status: str  # one of VALUE_STATUSES
    a: Any
    b: Any


@dataclass
class DiffResult:
    a: str
    b: str
    only: str | None
    tensors: list[TensorRow]
    values: list[ValueRow]

    @property
    def identical(self) -> bool:
        tensors_same = all(row.status == "identical" for row in self.tensors)
        return tensors_same and all(row.status == "identical" for row in self.values)


def diff_document(result: DiffResult) -> dict[str, Any]:
    return {
        "a": result.a,
        "b": result.b,
        "only": result.only,
        "identical": result.identical,
        "summary": summary(result),
        "tensors": [tensor_document(row) for row in result.tensors],
        "values": [
            {"path": row.path, "status": row.status, "a": row.a, "b": row.b}
            for row in result.values
            if row.status != "identical"
        ],
    }


def summary(result: DiffResult) -> dict[str, dict[str, int]]:
    return {
        "tensors": {s: sum(r.status == s for r in result.tensors) for s in TENSOR_STATUSES},
        "values": {s: sum(r.status == s for r in result.values) for s in VALUE_STATUSES},
    }


def tensor_document(row: TensorRow) -> dict[str, Any]:
    return {
        "path": row.path,
        "status": row.status,
        "a": _entry_document(row.a),
        "b": _entry_document(row.b),
        "dtype_changed": row.dtype_changed,
        "max_abs": row.max_abs,
        "rel_l2": row.rel_l2,
        "note": row.note,
    }


def _entry_document(entry: TensorEntry | None) -> dict[str, Any] | None:
    return {"dtype": entry.dtype, "shape": list(entry.shape)} if entry is not None else None


def show(console: Console, result: DiffResult) -> None:
    console.print(render.text(f"A  {result.a}"))
    console.print(render.text(f"B  {result.b}"))
    if result.only:
        console.print(render.text(f"only key paths under {result.only}"))
    console.print()
    if result.tensors:
        console.print(tensor_table(result.tensors))
    changed_values = [row for row in result.values if row.status != "identical"]
    if changed_values:
        console.print()
        console.print(value_table(changed_values))
    console.print()
    console.print(verdict(result))


def tensor_table(rows: list[TensorRow]) -> Table:
    table = Table(title="Tensors", box=None, header_style="bold", pad_edge=False)
    table.add_column("Key path", overflow="fold", min_width=_path_width(r.path for r in rows))
    table.add_column("Status", no_wrap=True)
    table.add_column("Dtype, shape", overflow="fold")
    table.add_column("max |a-b|", justify="right", no_wrap=True, min_width=11)
    table.add_column("rel L2", justify="right", no_wrap=True, min_width=11)
    if any(row.note for row in rows):
        table.add_column("Note", overflow="fold")
    for row in rows:
        cells = [
            render.text(_display_path(row.path)),
            render.text(_status_label(row), _STYLES[row.status]),
            render.text(_describe_pair(row.a, row.b)),
            Text(_number(row.max_abs)),
            Text(_number(row.rel_l2)),
        ]
        if len(table.columns) > len(cells):
            cells.append(render.text(row.note or ""))
        table.add_row(*cells)
    return table


def _path_width(paths: Iterable[str]) -> int:
    """Key paths stay whole up to 40 characters however narrow the terminal."""
    return min(40, max((len(_display_path(p)) for p in paths), default=8))


def _status_label(row: TensorRow) -> str:
    label = row.status.replace("_", " ")
    return f"{label} (dtype)" if row.dtype_changed and row.status == "changed" else label


def _describe_pair(a: TensorEntry | None, b: TensorEntry | None) -> str:
    """``float32 [3, 4]`` when both sides agree, else ``float32 [3] -> float32 [4]``."""
    described = [f"{e.dtype} {render.format_shape(e.shape)}" for e in (a, b) if e is not None]
    return " -> ".join(dict.fromkeys(described))


def _number(value: float | None) -> str:
    return f"{value:.6g}" if value is not None else "—"


def _display_path(path: str) -> str:
    return path or "<root>"


def value_table(rows: list[ValueRow]) -> Table:
    table = Table(title="Plain values", box=None, header_style="bold", pad_edge=False)
    table.add_column("Key path", overflow="fold", min_width=_path_width(r.path for r in rows))
    table.add_column("Status", no_wrap=True)
    table.add_column("A", overflow="fold")
    table.add_column("B", overflow="fold")
    for row in rows:
        table.add_row(
            render.text(_display_path(row.path)),
            render.text(row.status, _STYLES[row.status]),
            render.text(_shown(row.a) if row.status != "added" else "—"),
            render.text(_shown(row.b) if row.status != "removed" else "—"),
        )
    return table


def _shown(value: Any) -> str:
    return runs.shorten(repr(value), 200)


def verdict(result: DiffResult) -> Text:
    counts = summary(result)
    if result.identical:
        return render.text("Identical", "bold green")
    tensor_words = [
        f"{count} {status.replace('_', ' ')}"
        for status, count in counts["tensors"].items()
        if count
    ]
    value_words = [
        f"{count} {status}"
        for status, count in counts["values"].items()
        if count and status != "identical"
    ]
    text = render.text("Differ", "bold red")
    text.append(render.printable(f": tensors {', '.join(tensor_words) or 'none'}"))
    if value_words:
        text.append(f"; plain values {', '.join(value_words)}")
    return text
