"""``statevault import SRC --to CKPT``: another tool's checkpoint as a statevault checkpoint.

Sources (``--from``, detected when omitted): ``tf`` (a TensorFlow checkpoint prefix, read with
``tf.train.load_checkpoint``), ``safetensors`` (a file), ``torch`` (a ``torch.save`` file, read
with ``weights_only=True``), ``dcp`` (a ``torch.distributed.checkpoint`` directory: its metadata
is a pickle, so importing it trusts the source as DCP does). Nothing is written at CKPT on
failure. ``--json`` prints::

    {"source": ..., "target": ..., "from": "tf", "arrays": int, "skipped": [names]}
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from statevault.cli import render
from statevault.cli.common import ExitCode, add_command, add_json_flag, add_storage_options
from statevault.cli.common import storage_options as storage_options_of
from statevault.interop.importing import SOURCES, import_checkpoint

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
            "so importing it trusts the source exactly as DCP's own load does."
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
        help="what SRC is (detected when omitted)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint at CKPT (atomically)"
    )
    add_storage_options(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    report = import_checkpoint(
        args.source,
        args.to,
        from_=args.kind,
        overwrite=args.overwrite,
        storage_options=storage_options_of(args),
    )
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
