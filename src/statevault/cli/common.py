"""What every subcommand shares: exit codes, the command contract and common arguments."""

from __future__ import annotations

import argparse
import enum
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from statevault.errors import CheckpointError
from statevault.storage.location import local_directory

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

# What a subcommand's ``run`` looks like: the parsed arguments in, an exit code out.
Handler = Callable[[argparse.Namespace], int]


class ExitCode(enum.IntEnum):
    """The exit statuses scripts can rely on (also in ``statevault --help``)."""

    OK = 0
    PROBLEMS = 1
    USAGE = 2
    INTERNAL = 3
    INTERRUPTED = 130
    BROKEN_PIPE = 141


EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success: the checkpoint is sound; diff: the checkpoints are identical",
    ExitCode.PROBLEMS: (
        "problems found: a damaged checkpoint (each problem named); diff: they differ"
    ),
    ExitCode.USAGE: "usage error, no checkpoint at PATH, unsupported format or storage, I/O error",
    ExitCode.INTERNAL: "internal error: a bug in statevault (a traceback is printed)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
    ExitCode.BROKEN_PIPE: "stdout was closed before all output was written (`... | head`)",
}


def exit_codes_epilog() -> str:
    """The exit-code table shown at the end of every ``--help``."""
    rows = [f"  {int(code):<5}{meaning}" for code, meaning in EXIT_CODE_MEANINGS.items()]
    return "exit codes:\n" + "\n".join(rows)


def add_command(
    subparsers: Subparsers, name: str, *, summary: str, description: str, handler: Handler
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` whose ``run`` is ``handler``; returns its parser for arguments.

    Example (the whole ``register`` of a command module)::

        def register(subparsers: Subparsers) -> None:
            parser = add_command(subparsers, "ls", summary="...", description="...", handler=run)
            add_path_argument(parser)
    """
    parser = subparsers.add_parser(
        name,
        help=summary,
        description=description,
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def add_path_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="checkpoint directory (or file:// URL)")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document on stdout instead of tables (for scripts)",
    )


STORAGE_OPTIONS_ENV = "STATEVAULT_STORAGE_OPTIONS"


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    """``--storage-option KEY=VALUE`` (repeatable): fsspec options for URLs. Dotted keys nest
    (``client_kwargs.endpoint_url=http://...``); values are JSON where they parse (``true``,
    ``3``), else strings. ``$STATEVAULT_STORAGE_OPTIONS`` may hold a JSON object of defaults;
    fsspec's own environment (``AWS_*``, ``FSSPEC_S3_*``) works too."""
    parser.add_argument(
        "--storage-option",
        dest="storage_option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for URLs, e.g. client_kwargs.endpoint_url=http://minio:9000 "
        f"(repeatable; defaults from ${STORAGE_OPTIONS_ENV}, a JSON object)",
    )


def storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The storage options the command line and the environment give (None: none at all)."""
    options: dict[str, Any] = {}
    env = os.environ.get(STORAGE_OPTIONS_ENV)
    if env:
        try:
            loaded = json.loads(env)
        except ValueError as exc:
            raise CheckpointError(f"${STORAGE_OPTIONS_ENV} is not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise CheckpointError(f"${STORAGE_OPTIONS_ENV} must be a JSON object")
        options.update(loaded)
    for item in getattr(args, "storage_option", None) or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise CheckpointError(f"--storage-option takes KEY=VALUE, got {item!r}")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        target = options
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise CheckpointError(f"--storage-option {key}: {part} is not a mapping")
        target[leaf] = value
    return options or None


def is_url(path: str) -> bool:
    """True for a URL other than ``file://`` (those go through fsspec)."""
    return local_directory(path) is None
