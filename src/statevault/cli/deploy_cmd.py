"""``statevault deploy CKPT --build MODULE:FUNCTION --to OUT``: a model for serving.

The builder (``package.module:function`` or ``path/to/file.py:function``) builds the model;
the checkpoint's weights are loaded into it, every byte verified; it is written as a TF
SavedModel (a Keras model), a ``torch.export`` program (a torch module; the builder returns
``(model, example_args)``) or a Hugging Face ``save_pretrained`` directory (an HF model). See
:mod:`statevault.interop.deploy`. ``--json`` prints::

    {"source": ..., "target": ..., "format": "savedmodel" | "torch-export" | "hf",
     "only": str | null, "model": "package.Class"}
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from statevault.cli import render, runs
from statevault.cli.common import (
    ExitCode,
    add_command,
    add_json_flag,
    add_path_argument,
    add_storage_options,
    storage_options,
)
from statevault.interop.deploy import FORMATS, deploy

if TYPE_CHECKING:
    from statevault.cli.common import Subparsers


def register(subparsers: Subparsers) -> None:
    parser = add_command(
        subparsers,
        "deploy",
        summary="export a checkpoint's model for serving (SavedModel, torch.export, HF)",
        description=(
            "Build the model with --build (MODULE:FUNCTION or FILE.py:FUNCTION; for "
            "torch-export it returns (model, example_args)), load the checkpoint's weights "
            "into it (every byte verified; by default the subtree model, else state_dict, "
            "else the whole checkpoint) and write it: a Keras model as a TF SavedModel, a "
            "Hugging Face model with save_pretrained, any other torch module as a "
            "torch.export program. Only the model is exported: optimizer, scheduler, random "
            "streams and trainer state stay in the checkpoint."
        ),
        handler=run,
    )
    add_path_argument(parser)
    parser.add_argument(
        "--build", required=True, metavar="MODULE:FUNCTION", help="the function that builds it"
    )
    parser.add_argument("--to", required=True, metavar="OUT", help="where to write it (local)")
    parser.add_argument(
        "--format", choices=FORMATS, help="default: by the model's type (see above)"
    )
    parser.add_argument("--only", metavar="KEY", help="the subtree holding the model's weights")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export of this format at OUT"
    )
    add_storage_options(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    try:
        report = deploy(
            args.path,
            args.build,
            args.to,
            format=args.format,
            only=args.only,
            overwrite=args.overwrite,
            storage_options=storage_options(args),
        )
    except (ValueError, TypeError, ImportError, AttributeError) as exc:
        raise runs.UsageError(f"deploy {args.path}: {exc}") from exc
    if args.json:
        render.emit_json(dataclasses.asdict(report))
    else:
        console = render.make_console()
        subtree = f" (subtree {report.only})" if report.only else ""
        line = f"{report.source}{subtree} -> {report.target}: {report.format} of {report.model}"
        console.print(render.text("DEPLOYED", "bold green"), render.text(line))
    return ExitCode.OK


__all__ = ["register", "run"]
