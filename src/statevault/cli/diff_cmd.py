"""``statevault diff A B``: what changed between two checkpoints, key path by key path.

Both trees are flattened to key paths (``model/0.weight``, ``optimizer/param_groups/0/lr``) and
compared: tensors and plain values added or removed, tensors whose shape or dtype changed, plain
values that differ (both shown), and for every tensor present in both with the same shape
whether it changed. The manifests decide first: equal dtype, size and checksum means identical,
without reading a byte. Only the tensors that differ are read (checksums verified, one pair at
a time), and for them the largest absolute difference ``max |a-b|`` and the relative L2 distance
``||a-b|| / ||a||`` are computed in float64 (complex128 for complex). numpy does the arithmetic
where it knows the dtype; dtypes it lacks (bfloat16, float8) go through torch, imported only
then; without torch those rows say so. Positions where both sides are NaN, or the same infinity,
count as equal.

Exit status, as diff(1): 0 when the checkpoints are identical (under ``--only PREFIX`` if given),
1 when they differ, 2 on errors (a path that is not a checkpoint, a damaged checkpoint).
``--json`` prints one document::

    {"a": path, "b": path, "only": prefix | null, "identical": bool,
     "summary": {"tensors": {"added", "removed", "shape_changed", "changed", "identical"},
                 "values": {"added", "removed", "changed", "identical"}},
     "tensors": [{"path", "status": "added" | "removed" | "shape_changed" | "changed" |
                  "identical", "a": {"dtype", "shape"} | null, "b": {...} | null,
                  "dtype_changed": bool, "max_abs": float | null, "rel_l2": float | null,
                  "note": str | null}],
     "values": [{"path", "status": "added" | "removed" | "changed", "a", "b"}]}
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.console import Console

from statevault.checkpoint import OpenCheckpoint, local_path, open_checkpoint
from statevault.cli import render, runs
from statevault.cli.common import (
    ExitCode,
    add_command,
    add_json_flag,
    add_storage_options,
    is_url,
    storage_options,
)
from statevault.cli.diff_numeric import NoArithmetic, backend_for, distances, read_tensor
from statevault.cli.diff_render import DiffResult, TensorRow, ValueRow, diff_document, show
from statevault.errors import CheckpointError, CorruptCheckpointError
from statevault.format import tree as tree_codec
from statevault.format.manifest import TensorEntry

if TYPE_CHECKING:
    from statevault.cli.common import Subparsers


def register(subparsers: Subparsers) -> None:
    parser = add_command(
        subparsers,
        "diff",
        summary="compare two checkpoints: keys, shapes, dtypes, max |a-b|, relative L2",
        description=(
            "Compare checkpoints A and B key path by key path: tensors and plain values added "
            "or removed, shape and dtype changes, plain values that differ, and for changed "
            "tensors max |a-b| and ||a-b|| / ||a||. Tensors with equal manifest checksums are "
            "identical without being read. Exits 0 when identical, 1 when they differ, 2 on "
            "errors (as diff(1) does)."
        ),
        handler=run,
    )
    parser.add_argument("a", metavar="A", help="the first checkpoint directory")
    parser.add_argument("b", metavar="B", help="the second checkpoint directory")
    parser.add_argument(
        "--only", metavar="PREFIX", help="compare only key paths under PREFIX (e.g. model)"
    )
    add_storage_options(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    console = render.make_console()
    try:
        options = storage_options(args)
        a, b = open_diffable(args.a, options), open_diffable(args.b, options)
        result = compare(a, b, args.only)
        measure_changed(result, a, b, console, show_progress=not args.json)
    except CorruptCheckpointError as exc:  # damage is an error here (2), not a difference (1)
        raise CheckpointError(str(exc)) from exc
    if args.json:
        render.emit_json(diff_document(result))
    else:
        show(console, result)
    return ExitCode.OK if result.identical else ExitCode.PROBLEMS


def open_diffable(path: str, options: Mapping[str, Any] | None = None) -> OpenCheckpoint:
    """The checkpoint at ``path``; a run directory is refused with a hint to name a step."""
    if is_url(path):
        return open_checkpoint(path, options)
    if not runs.is_checkpoint_dir(local_path(path)) and runs.is_run_dir(local_path(path)):
        raise runs.UsageError(
            f"{path} is a run directory, not a checkpoint: name one of its step_* directories "
            "(`statevault ls` lists them)"
        )
    return open_checkpoint(path)


# ---- flattening -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    """Stands for tensor row ``index`` while the tree is flattened."""

    index: int


@dataclass
class Flat:
    tensors: dict[str, int] = field(default_factory=dict)  # key path -> manifest row
    values: dict[str, Any] = field(default_factory=dict)  # key path -> plain value


def flatten(checkpoint: OpenCheckpoint) -> Flat:
    """Every leaf of the checkpoint's tree by key path (manifest only; nothing is read)."""
    count = len(checkpoint.manifest.tensors)

    def resolve(index: int) -> _Slot:
        if not 0 <= index < count:
            raise CorruptCheckpointError(f"{checkpoint.directory}: tree refers to tensor {index}")
        return _Slot(index)

    flat = Flat()
    _walk(tree_codec.decode(checkpoint.manifest.tree, resolve, checkpoint.directory), "", flat)
    return flat


def _walk(node: Any, path: str, flat: Flat) -> None:
    if isinstance(node, _Slot):
        flat.tensors[path] = node.index
    elif isinstance(node, Mapping) and node:
        for key, value in node.items():
            _walk(value, tree_codec.join_path(path, key), flat)
    elif isinstance(node, (list, tuple)) and node:
        for i, value in enumerate(node):
            _walk(value, tree_codec.join_path(path, i), flat)
    else:  # a plain value, or an empty container
        flat.values[path] = node


def restrict(flat: Flat, prefix: str | None) -> Flat:
    if not prefix:
        return flat
    prefix = prefix.strip("/")

    def keep(path: str) -> bool:
        return path == prefix or path.startswith(prefix + "/")

    return Flat(
        {p: i for p, i in flat.tensors.items() if keep(p)},
        {p: v for p, v in flat.values.items() if keep(p)},
    )


# ---- comparing --------------------------------------------------------------------------------


def compare(a: OpenCheckpoint, b: OpenCheckpoint, only: str | None) -> DiffResult:
    """Compare the two trees from their manifests; changed tensors are measured later."""
    flat_a, flat_b = restrict(flatten(a), only), restrict(flatten(b), only)
    tensors = [
        tensor_row(path, a, flat_a.tensors.get(path), b, flat_b.tensors.get(path))
        for path in sorted(flat_a.tensors.keys() | flat_b.tensors.keys())
    ]
    values = [
        value_row(path, flat_a.values, flat_b.values)
        for path in sorted(flat_a.values.keys() | flat_b.values.keys())
    ]
    return DiffResult(a.directory, b.directory, only, tensors, values)


def tensor_row(
    path: str, a: OpenCheckpoint, a_index: int | None, b: OpenCheckpoint, b_index: int | None
) -> TensorRow:
    entry_a = a.manifest.tensors[a_index] if a_index is not None else None
    entry_b = b.manifest.tensors[b_index] if b_index is not None else None
    if entry_a is None or entry_b is None:
        return TensorRow(path, "removed" if entry_b is None else "added", entry_a, entry_b)
    if entry_a.shape != entry_b.shape:
        status = "shape_changed"
    elif same_bytes(entry_a, entry_b):
        return TensorRow(path, "identical", entry_a, entry_b, max_abs=0.0, rel_l2=0.0)
    else:
        status = "changed"
    return TensorRow(path, status, entry_a, entry_b, a_index, b_index)


def same_bytes(a: TensorEntry, b: TensorEntry) -> bool:
    """Equal dtype, size and checksum: identical without reading (CRC32C, as verify trusts)."""
    return a.dtype == b.dtype and a.nbytes == b.nbytes and a.checksum == b.checksum


def value_row(path: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> ValueRow:
    if path not in b:
        return ValueRow(path, "removed", a[path], None)
    if path not in a:
        return ValueRow(path, "added", None, b[path])
    status = "identical" if same_value(a[path], b[path]) else "changed"
    return ValueRow(path, status, a[path], b[path])


def same_value(x: Any, y: Any) -> bool:
    """Equal and of the same type (1, 1.0 and True differ); NaN equals NaN."""
    if type(x) is not type(y):
        return False
    try:
        return bool(x == y) or bool(x != x and y != y)
    except (TypeError, ValueError):
        return repr(x) == repr(y)


# ---- measuring changed tensors ----------------------------------------------------------------


def measure_changed(
    result: DiffResult,
    a: OpenCheckpoint,
    b: OpenCheckpoint,
    console: Console,
    *,
    show_progress: bool,
) -> None:
    """Read each changed pair of tensors and fill in max |a-b| and the relative L2 distance."""
    todo = [row for row in result.tensors if row.status == "changed"]
    if not todo:
        return
    for checkpoint in (a, b):
        problems = checkpoint.reader.file_problems(check_headers=True)
        if problems:
            raise CorruptCheckpointError(f"{checkpoint.directory} is damaged: {problems[0]}")
    total = sum(_pair_bytes(row) for row in todo)
    enabled = show_progress and len(todo) > runs.HANDFUL
    with runs.progress(console, "Comparing tensors", total, enabled=enabled) as advance:
        for row in todo:
            measure(row, a, b)
            advance(_pair_bytes(row))


def _pair_bytes(row: TensorRow) -> int:
    return (row.a.nbytes if row.a else 0) + (row.b.nbytes if row.b else 0)


def measure(row: TensorRow, a: OpenCheckpoint, b: OpenCheckpoint) -> None:
    assert row.a is not None and row.b is not None
    assert row.a_index is not None and row.b_index is not None
    if math.prod(row.a.shape) == 0:
        row.max_abs, row.rel_l2 = 0.0, 0.0
        return
    try:
        arithmetic = backend_for(row.a, row.b)
        values_a, values_b = read_tensor(a, row.a_index), read_tensor(b, row.b_index)
        row.max_abs, row.rel_l2 = distances(arithmetic, values_a, row.a, values_b, row.b)
    except NoArithmetic as exc:
        row.note = str(exc)
