"""``statevault inspect PATH``: what a checkpoint holds, read from its manifest alone.

Shows the user metadata, when and with which versions the checkpoint was saved, the save's
timings, then one row per stored array (key path, framework, dtype, shape, bytes, file) and the
totals. No tensor payload is read, so it is instant on any size and works on a checkpoint whose
shards are missing or damaged (``statevault verify`` checks those).

``--json`` prints one document instead::

    {"path": ..., "metadata": <decoded, see render.to_json_value>, "info": {...},
     "files": [{"name", "size", "header_size", "header_checksum"}, ...],
     "tensors": [{"path", "framework", "dtype", "shape", "nbytes", "file", "offset",
                  "checksum", "attrs"}, ...],
     "totals": {"tensors", "tensor_bytes", "files", "file_bytes"}}
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from rich.console import Console, RenderableType
from rich.pretty import Pretty
from rich.table import Table
from rich.text import Text

from statevault.checkpoint import OpenCheckpoint, open_checkpoint
from statevault.cli import render
from statevault.cli.common import (
    ExitCode,
    add_command,
    add_json_flag,
    add_path_argument,
    add_storage_options,
    storage_options,
)
from statevault.errors import CheckpointError
from statevault.format import tree, tree_paths
from statevault.format.manifest import Manifest, TensorEntry

if TYPE_CHECKING:
    from statevault.cli.common import Subparsers


def register(subparsers: Subparsers) -> None:
    parser = add_command(
        subparsers,
        "inspect",
        summary="show a checkpoint's metadata and arrays (reads the manifest only)",
        description=(
            "Show a checkpoint's metadata, save info and one row per stored array. Reads only "
            "manifest.json, never tensor payload: use `statevault verify` to check the bytes."
        ),
        handler=run,
    )
    add_path_argument(parser)
    parser.add_argument(
        "--only", metavar="KEY", help="show only this subtree's arrays (a key path: model)"
    )
    add_storage_options(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    checkpoint = open_checkpoint(args.path, storage_options(args))
    if args.only is not None:
        checkpoint = only_subtree(checkpoint, args.only)
    metadata = decode_metadata(checkpoint)
    if args.json:
        render.emit_json(inspect_document(checkpoint, metadata))
    else:
        show(render.make_console(), checkpoint, metadata)
    return ExitCode.OK


class TensorRef:
    """Stands for a tensor node found in the metadata (save never writes one; verify allows it)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<tensor {self.index}>"


def only_subtree(checkpoint: OpenCheckpoint, key: str) -> OpenCheckpoint:
    """The checkpoint as if it held only the arrays of subtree ``key`` (and their files)."""
    manifest = checkpoint.manifest
    try:
        node = tree_paths.subtree(manifest.tree, key, checkpoint.directory)
    except KeyError as exc:
        raise CheckpointError(str(exc.args[0])) from None
    ids = sorted(i for i in tree_paths.tensor_ids(node) if 0 <= i < len(manifest.tensors))
    tensors = [manifest.tensors[i] for i in ids]
    names = {entry.file for entry in tensors}
    files = [entry for entry in manifest.files if entry.name in names]
    subset = dataclasses.replace(manifest, tensors=tensors, files=files, tree=node)
    return OpenCheckpoint(checkpoint.location, subset)


def decode_metadata(checkpoint: OpenCheckpoint) -> Any:
    """The user's metadata as python values; CorruptCheckpointError if it is malformed."""
    return tree.decode(checkpoint.manifest.metadata, TensorRef, checkpoint.directory)


# --json ---------------------------------------------------------------------------------------


def inspect_document(checkpoint: OpenCheckpoint, metadata: Any) -> dict[str, Any]:
    manifest = checkpoint.manifest
    return {
        "path": checkpoint.directory,
        "metadata": metadata,
        "info": manifest.info,
        "files": [asdict(entry) for entry in manifest.files],
        "tensors": [tensor_document(entry) for entry in manifest.tensors],
        "totals": totals(manifest),
    }


def tensor_document(entry: TensorEntry) -> dict[str, Any]:
    row = asdict(entry)
    row["shape"] = list(entry.shape)
    return row


def totals(manifest: Manifest) -> dict[str, int]:
    return {
        "tensors": len(manifest.tensors),
        "tensor_bytes": sum(t.nbytes for t in manifest.tensors),
        "files": len(manifest.files),
        "file_bytes": manifest.total_bytes(),
    }


# tables ---------------------------------------------------------------------------------------


def show(console: Console, checkpoint: OpenCheckpoint, metadata: Any) -> None:
    console.print(summary_grid(checkpoint, metadata))
    console.print()
    console.print(tensor_table(checkpoint.manifest))
    console.print(totals_line(checkpoint.manifest))


def summary_grid(checkpoint: OpenCheckpoint, metadata: Any) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("Checkpoint", render.text(checkpoint.directory))
    for label, value in info_rows(checkpoint.manifest.info):
        grid.add_row(label, value)
    for label, value in metadata_rows(metadata):
        grid.add_row(label, value)
    return grid


def info_rows(info: Mapping[str, Any]) -> list[tuple[str, RenderableType]]:
    """Created, versions and save first, in words; any other entry as it is."""
    rows: list[tuple[str, RenderableType]] = []
    shown = {"created_unix"}  # repeats created
    if isinstance(info.get("created"), str):
        rows.append(("Created", render.text(info["created"])))
        shown.add("created")
    if isinstance(info.get("versions"), Mapping):
        versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
        rows.append(("Versions", render.text(versions)))
        shown.add("versions")
    if isinstance(info.get("save"), Mapping):
        rows.append(("Save", render.text(describe_save(info["save"]))))
        shown.add("save")
    for key, value in info.items():
        if key not in shown:
            rows.append((render.printable(key.replace("_", " ").capitalize()), Pretty(value)))
    return rows


def describe_save(save: Mapping[str, Any]) -> str:
    """``{"bytes": 2048, "write_s": 0.01, ...}`` -> ``'2.0 KiB, write 10.0 ms, ...'``."""
    return ", ".join(_describe_measure(key, value) for key, value in save.items())


def _describe_measure(key: str, value: Any) -> str:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and key == "bytes":
        return render.human_bytes(int(value))
    if number and key == "tensors":
        return render.plural(int(value), "tensor")
    if number and key.endswith("_gib_s"):
        return f"{value} GiB/s"
    if number and key.endswith("_s"):
        return f"{key[:-2]} {render.human_seconds(float(value))}"
    return f"{key} {value}"


def metadata_rows(metadata: Any) -> list[tuple[str, RenderableType]]:
    if metadata is None:
        return []
    if not isinstance(metadata, Mapping) or not metadata:
        return [("Metadata", Pretty(metadata))]
    return [
        ("Metadata" if i == 0 else "", _metadata_entry(key, value))
        for i, (key, value) in enumerate(metadata.items())
    ]


def _metadata_entry(key: Any, value: Any) -> RenderableType:
    label = key if isinstance(key, str) else repr(key)
    grid = Table.grid(padding=(0, 1))
    grid.add_row(render.text(f"{label}:", "cyan"), Pretty(value))
    return grid


def tensor_table(manifest: Manifest) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("Key path", overflow="fold")
    table.add_column("Framework", no_wrap=True)
    table.add_column("Dtype", no_wrap=True)
    table.add_column("Shape", no_wrap=True)
    table.add_column("Bytes", justify="right", no_wrap=True)
    table.add_column("File", overflow="fold")
    for entry in manifest.tensors:
        table.add_row(
            render.text(entry.path),
            render.text(entry.framework),
            render.text(entry.dtype),
            render.format_shape(entry.shape),
            render.human_bytes(entry.nbytes),
            render.text(entry.file),
        )
    return table


def totals_line(manifest: Manifest) -> Text:
    data = sum(t.nbytes for t in manifest.tensors)
    return render.text(
        f"Total: {render.plural(len(manifest.tensors), 'tensor')}, {render.human_bytes(data)} "
        f"of data in {render.plural(len(manifest.files), 'file')} "
        f"({render.human_bytes(manifest.total_bytes())} on disk with headers)"
    )
