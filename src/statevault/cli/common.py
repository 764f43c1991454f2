"""What every subcommand shares: exit codes, the command contract and common arguments."""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import os
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

from statevault.cli import render, runs
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


class ByteBar:
    """A byte progress bar on stderr for a library call that takes a ``progress=``
    (:class:`~statevault.interop.progress.ByteProgress`): drawn by :func:`runs.progress`, so only
    on a terminal, and only when ``enabled`` (commands pass ``not args.json``). The call tells
    the total itself (``start``), once it has planned its work; the bar goes at the block's end.
    Example::

        with ByteBar("Exporting", enabled=not args.json) as bar:
            report = export_safetensors(args.path, args.to, progress=bar)
    """

    def __init__(self, description: str, *, enabled: bool) -> None:
        self.description = description
        self.enabled = enabled
        self._open = contextlib.ExitStack()
        self._advance: Callable[[float], None] | None = None

    def __enter__(self) -> ByteBar:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._open.close()

    def start(self, total: int) -> None:
        bar = runs.progress(render.error_console(), self.description, total, enabled=self.enabled)
        self._advance = self._open.enter_context(bar)

    def advance(self, amount: int) -> None:
        if self._advance is not None:
            self._advance(amount)
