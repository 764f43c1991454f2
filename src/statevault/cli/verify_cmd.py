"""``statevault verify PATH``: check every byte of a checkpoint against its manifest.

Exit 0 and one ``OK`` line when the checkpoint is sound; exit 1 and one line per problem (each
naming the damaged leaf's key path or the file) when it is not. A progress bar (bytes
checksummed) is drawn on stderr when it is a terminal, never with ``--json``, which prints::

    {"path": ..., "ok": bool, "files": int, "tensors": int, "bytes_checked": int,
     "problems": ["tensor model/weight in data-r00000-00000.safetensors: checksum mismatch"]}
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console

from statevault.checkpoint import open_checkpoint
from statevault.checkpoint.verify import VerifyReport, verify
from statevault.cli import render
from statevault.cli.common import (
    ByteBar,
    ExitCode,
    add_command,
    add_json_flag,
    add_path_argument,
    add_storage_options,
    storage_options,
)
from statevault.errors import CorruptCheckpointError

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
    with ByteBar("Verifying", enabled=not args.json) as bar:
        report = verify(args.path, only=args.only, storage_options=options, progress=bar)
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
