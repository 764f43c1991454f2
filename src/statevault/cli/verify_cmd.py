"""``statevault verify PATH``: check every byte of a checkpoint against its manifest.

Exit 0 and one ``OK`` line when the checkpoint is sound; exit 1 and one line per problem (each
naming the damaged leaf's key path or the file) when it is not. ``--json`` prints::

    {"path": ..., "ok": bool, "files": int, "tensors": int, "bytes_checked": int,
     "problems": ["tensor model/weight in data-r00000-00000.safetensors: checksum mismatch"]}
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console

from statevault.checkpoint import VerifyReport, open_checkpoint, verify
from statevault.cli import render
from statevault.cli.common import (
    ExitCode,
    add_command,
    add_json_flag,
    add_path_argument,
    add_storage_options,
    storage_options,
)
from statevault.engine.reader import CheckpointReader
from statevault.errors import CheckpointError, CorruptCheckpointError
from statevault.format import tree
from statevault.format.manifest import TensorEntry
from statevault.storage.location import resolve

if TYPE_CHECKING:
    from statevault.cli.common import Subparsers


def register(subparsers: Subparsers) -> None:
    parser = add_command(
        subparsers,
        "verify",
        summary="check every file and tensor checksum; exit 1 if anything is damaged",
        description=(
            "Check a checkpoint's manifest, files, safetensors headers and every tensor's "
            "checksum, without loading it into any framework. Each problem names the damaged "
            "leaf's key path or file."
        ),
        handler=run,
    )
    add_path_argument(parser)
    parser.add_argument(
        "--only",
        metavar="KEY",
        help="check only this subtree (a key path such as model or optimizer/state), reading "
        "only its tensors' bytes and its files' headers",
    )
    add_storage_options(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    options = storage_options(args)
    raise_if_unreadable(args.path, options)
    if args.only is not None:
        report = verify_subtree(args.path, args.only, options)
    else:
        report = verify(args.path, **({"storage_options": options} if options else {}))
    if args.json:
        render.emit_json(report_document(report))
    else:
        show(render.make_console(), report)
    return ExitCode.OK if report.ok else ExitCode.PROBLEMS


def raise_if_unreadable(path: str, options: Mapping[str, Any] | None = None) -> None:
    """Raise what makes a checkpoint uncheckable (nothing there, a newer format, a URL scheme).

    ``verify`` reports an unsupported format as one of its problems, which would exit 1 as if
    the checkpoint were damaged; opening it first (manifest only) lets that exit 2 instead.
    Damage is left for ``verify`` to report in full.
    """
    with contextlib.suppress(CorruptCheckpointError):
        open_checkpoint(path, options)


def verify_subtree(path: str, key: str, options: Mapping[str, Any] | None) -> VerifyReport:
    """:func:`statevault.verify` of one subtree: the files holding its tensors (sizes and
    safetensors headers) and its tensors' checksums; nothing else of the payload is read."""
    location = resolve(path, options)
    report = VerifyReport(location.url)
    try:
        checkpoint = open_checkpoint(location)
    except CorruptCheckpointError as exc:
        report.problems.extend(exc.problems)
        return report
    manifest = checkpoint.manifest
    try:
        node = tree.subtree(manifest.tree, key, checkpoint.directory)
    except KeyError as exc:
        raise CheckpointError(str(exc.args[0])) from None
    ids = sorted(tree.tensor_ids(node))
    bad = [i for i in ids if not 0 <= i < len(manifest.tensors)]
    if bad:
        report.problems.append(f"subtree {key} refers to tensor {bad[0]}, which does not exist")
        return report
    names = {manifest.tensors[i].file for i in ids}
    subset = dataclasses.replace(manifest, files=[f for f in manifest.files if f.name in names])
    reader = CheckpointReader(location, subset)
    report.files, report.tensors = len(subset.files), len(ids)
    report.problems.extend(reader.file_problems(check_headers=True))
    if not report.problems:
        outcome = reader.read(ids, _scratch, verify=True)
        report.problems.extend(outcome.problems)
        report.bytes_checked = outcome.bytes_read
    return report


def _scratch(entry: TensorEntry) -> tuple[object, memoryview]:
    buffer = bytearray(entry.nbytes)
    return buffer, memoryview(buffer)


def report_document(report: VerifyReport) -> dict[str, Any]:
    return {
        "path": report.path,
        "ok": report.ok,
        "files": report.files,
        "tensors": report.tensors,
        "bytes_checked": report.bytes_checked,
        "problems": list(report.problems),
    }


def show(console: Console, report: VerifyReport) -> None:
    if report.ok:
        console.print(render.text("OK", "bold green"), render.text(ok_summary(report)))
        return
    count = render.plural(len(report.problems), "problem")
    console.print(render.text("DAMAGED", "bold red"), render.text(f"{report.path}: {count}"))
    for problem in report.problems:
        console.print(render.text(f"  - {problem}"))


def ok_summary(report: VerifyReport) -> str:
    return (
        f"{report.path}: {render.plural(report.files, 'file')}, "
        f"{render.plural(report.tensors, 'tensor')}, "
        f"{render.human_bytes(report.bytes_checked)} checked"
    )
