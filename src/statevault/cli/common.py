"""What every subcommand shares: exit codes, the command contract and common arguments."""

from __future__ import annotations

import argparse
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

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
