"""``statevault import SRC --to CKPT``: another tool's checkpoint as a statevault checkpoint.

Sources (``--from``, detected when omitted): ``tf`` (a TensorFlow checkpoint prefix, read with
``tf.train.load_checkpoint``), ``safetensors`` (a file), ``torch`` (a ``torch.save`` file, read
with ``weights_only=True``), ``dcp`` (a ``torch.distributed.checkpoint`` directory: its metadata
is a pickle, so importing it trusts the source as DCP does, and only ``--from dcp`` reads one;
detection refuses it). Nothing is written at CKPT on failure; a source that cannot be read,
damaged included, exits 2 with one line naming it (torch's warnings and log records are not
shown; one that explains the failure is quoted in it). A progress bar (bytes read from the
source) is drawn on stderr when it is a terminal, never with ``--json``, which prints::

    {"source": ..., "target": ..., "from": "tf", "arrays": int, "skipped": [names]}
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from statevault.cli import render
from statevault.cli.common import (
    ByteBar,
    ExitCode,
    add_command,
    add_json_flag,
    add_storage_options,
)
from statevault.cli.common import storage_options as storage_options_of
from statevault.errors import CheckpointError, CorruptCheckpointError
from statevault.interop.importing import SOURCES, ImportReport, import_checkpoint

if TYPE_CHECKING:
    from statevault.cli.common import Subparsers


def register(subparsers: Subparsers) -> None:
    parser = add_command(
        subparsers,
        "import",
        summary="convert a TF, safetensors, torch.save or DCP checkpoint into a statevault one",
        description=(
            "Convert another tool's checkpoint into a statevault checkpoint (saved atomically: "
            "on failure nothing is written at CKPT). tf: a TensorFlow checkpoint prefix "
            "(ckpt-3 with ckpt-3.index) or a directory with a 'checkpoint' file; variable names "
            "become keys. safetensors: a file; its __metadata__ is kept in the checkpoint's "
            "metadata. torch: a torch.save file, read with torch.load(weights_only=True) (never "
            "runs code; a file holding more than weights is refused). dcp: a "
            "torch.distributed.checkpoint directory, consolidated; DCP's .metadata is a pickle, "
            "so importing it trusts the source exactly as DCP's own load does: it is never "
            "detected, only read with --from dcp."
        ),
        handler=run,
    )
    parser.add_argument("source", metavar="SRC", help="the checkpoint to convert (local path)")
    parser.add_argument(
        "--to",
        required=True,
        metavar="CKPT",
        help="the statevault checkpoint to write (a path or URL)",
    )
    parser.add_argument(
        "--from",
        dest="kind",
        choices=SOURCES,
        help="what SRC is (detected when omitted, except dcp: its metadata is a pickle, so "
        "reading one must be asked for)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint at CKPT (atomically)"
    )
    add_storage_options(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    report = convert(args)
    if args.json:
        render.emit_json(
            {
                "source": report.source,
                "target": report.target,
                "from": report.kind,
                "arrays": report.arrays,
                "skipped": report.skipped,
            }
        )
    else:
        console = render.make_console()
        skipped = f"; skipped {', '.join(report.skipped)}" if report.skipped else ""
        console.print(
            render.text("IMPORTED", "bold green"),
            render.text(
                f"{report.source} ({report.kind}) -> {report.target}: "
                f"{render.plural(report.arrays, 'array')}{skipped}"
            ),
        )
    return ExitCode.OK


def convert(args: argparse.Namespace) -> ImportReport:
    """The import, behind a progress bar. A damaged source is a CorruptCheckpointError to the
    library; here it exits 2, as any source that cannot be read does: exit 1 means that a
    statevault checkpoint was checked and found damaged."""
    try:
        with ByteBar("Reading the source", enabled=not args.json) as bar:
            return import_checkpoint(
                args.source,
                args.to,
                from_=args.kind,
                overwrite=args.overwrite,
                storage_options=storage_options_of(args),
                progress=bar,
            )
    except CorruptCheckpointError as exc:
        raise CheckpointError(str(exc)) from exc
