"""``statevault export CKPT --to OUT``: a checkpoint's arrays as safetensors.

``--format safetensors`` (default) writes one ``.safetensors`` file, arrays named by key path
relative to ``--only`` (``optimizer/state/0/exp_avg``); ``--format hf`` a directory of
``model-0000i-of-0000N.safetensors`` files (at most ``--max-shard-size`` each, an option of this
format only) with ``model.safetensors.index.json``, arrays named as HF names them
(``layers.0.weight``: dots between key-path parts) and one model per directory (without
``--only``, arrays under several top-level keys are refused; see
:mod:`statevault.interop.export`). Sharded tensors are consolidated; non-array values are
skipped and counted. A progress bar (bytes written) is drawn on stderr when it is a terminal,
never with ``--json``, which prints::

    {"source": ..., "target": ..., "format": "safetensors", "only": str | null, "files": [...],
     "tensors": int, "bytes": int, "skipped": {"value": int, "per_rank": int},
     "skipped_total": int}
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Any

from statevault.cli import render, runs
from statevault.cli.common import (
    ByteBar,
    ExitCode,
    add_command,
    add_json_flag,
    add_path_argument,
    add_storage_options,
    storage_options,
)
from statevault.errors import CheckpointError
from statevault.interop import casting
from statevault.interop.export import (
    DEFAULT_MAX_SHARD_BYTES,
    ExportReport,
    export_hf,
    export_safetensors,
)

if TYPE_CHECKING:
    from statevault.cli.common import Subparsers

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def register(subparsers: Subparsers) -> None:
    parser = add_command(
        subparsers,
        "export",
        summary="write a checkpoint's arrays as safetensors (one file, or HF-style shards)",
        description=(
            "Write every array of a checkpoint (or of the subtree --only) as safetensors, "
            "named by key path relative to --only (--only model gives 0.weight, 2.bias, ...). "
            "--format hf names arrays with dots between key-path parts (layers.0.weight) and "
            "writes one model: without --only, the arrays must sit at the root or under one "
            "top-level key (exported as if --only named it). "
            "Sharded tensors of distributed checkpoints are consolidated into full tensors. "
            "Memory stays bounded (a few tens of MiB of buffers, whatever the model's size): "
            "the header is written first, then each array as it is read, every byte checked "
            "against its checksum. Plain values (numbers, strings) and per-rank state are not "
            "exported; the output says how many were skipped. The output is written under a "
            "temporary name and renamed into place."
        ),
        handler=run,
    )
    add_path_argument(parser)
    parser.add_argument(
        "--to",
        required=True,
        metavar="OUT",
        help="the .safetensors file (or, with --format hf, the directory) to write; a local path",
    )
    parser.add_argument(
        "--only", metavar="KEY", help="export only this subtree (a key path such as model)"
    )
    parser.add_argument(
        "--format",
        choices=("safetensors", "hf"),
        default="safetensors",
        help="safetensors: one file (default); hf: model-0000i-of-0000N.safetensors files and "
        "model.safetensors.index.json",
    )
    parser.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="--format hf only: the most array bytes per file (5GB, 500MB, 2GiB; default 5GB)",
    )
    parser.add_argument(
        "--dtype",
        choices=casting.TARGETS,
        default="keep",
        help="keep (default: bit for bit), or convert floating-point arrays to this dtype",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it exists (the new export is complete before the old one goes): "
        "a file, or with --format hf an earlier HF export; never any other directory",
    )
    add_storage_options(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    if args.max_shard_size is not None and args.format != "hf":
        raise runs.UsageError(
            "--max-shard-size applies to --format hf only (--format safetensors writes a "
            "single file): drop it, or add --format hf"
        )
    common: dict[str, Any] = {
        "only": args.only,
        "dtype": args.dtype,
        "overwrite": args.overwrite,
        "storage_options": storage_options(args),
    }
    with ByteBar("Exporting", enabled=not args.json) as bar:
        if args.format == "hf":
            given = args.max_shard_size
            limit = DEFAULT_MAX_SHARD_BYTES if given is None else parse_size(given)
            report = export_hf(args.path, args.to, max_shard_bytes=limit, progress=bar, **common)
        else:
            report = export_safetensors(args.path, args.to, progress=bar, **common)
    if args.json:
        render.emit_json(report_document(report))
    else:
        console = render.make_console()
        console.print(render.text("EXPORTED", "bold green"), render.text(summary(report)))
    return ExitCode.OK


def parse_size(text: str) -> int:
    """``5GB`` -> 5 * 10**9, ``2GiB`` -> 2 * 2**30, ``1000`` -> 1000 bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise CheckpointError(f"--max-shard-size takes a size such as 5GB or 500MiB, not {text!r}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise CheckpointError(f"--max-shard-size must be positive, not {text!r}")
    return size


def report_document(report: ExportReport) -> dict[str, Any]:
    return {
        "source": report.source,
        "target": report.target,
        "format": report.format,
        "only": report.only,
        "files": report.files,
        "tensors": report.tensors,
        "bytes": report.bytes,
        "skipped": report.skipped,
        "skipped_total": report.skipped_total,
    }


def summary(report: ExportReport) -> str:
    files = render.plural(len(report.files), "file")
    subtree = f" (subtree {report.only})" if report.only else ""
    text = (
        f"{report.source}{subtree} -> {report.target}: "
        f"{render.plural(report.tensors, 'tensor')} ({render.human_bytes(report.bytes)}) "
        f"in {files}"
    )
    if report.skipped_total:
        kinds = ", ".join(f"{n} {k}" for k, n in report.skipped.items())
        text += f"; {report.skipped_total} non-array values not exported ({kinds})"
    return text


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "parse_size", "register", "run"]
