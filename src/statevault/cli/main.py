"""``statevault``: the command line of statevault.

Usage::

    statevault inspect PATH [--json]    metadata, save info and arrays (manifest only)
    statevault verify PATH [--json]     check every byte against the manifest
    statevault ls PATH [--json]         a run's checkpoints, or the runs under a directory
    statevault diff A B [--json]        what changed between two checkpoints
    statevault rm PATH... [--yes]       delete checkpoints (dry run without --yes)
    statevault gc RUN [--yes]           delete leftovers of crashed saves (dry run without --yes)
    statevault export CKPT --to OUT     a checkpoint's arrays as safetensors (or --format hf)
    statevault import SRC --to CKPT     a TF / safetensors / torch.save / DCP (--from dcp) one
    statevault deploy CKPT --build M:F --to OUT   a model for serving (SavedModel, torch.export, HF)

Exit codes (scripts can rely on them)::

    0     success: the checkpoint is sound; diff: the checkpoints are identical
    1     problems found: a damaged checkpoint (each problem named); diff: they differ
    2     usage error, no checkpoint at PATH, unsupported format or storage, I/O error
    3     internal error: a bug in statevault (a traceback is printed)
    130   interrupted (Ctrl-C)
    141   stdout was closed before all output was written (`... | head`)

A :class:`~statevault.errors.CorruptCheckpointError` exits 1, any other
:class:`~statevault.errors.CheckpointError` exits 2; both print a message, never a traceback.
Results go to stdout (with ``--json``: one plain JSON document), errors to stderr.

Adding a subcommand: write ``statevault/cli/<name>_cmd.py`` with ``register(subparsers)`` and
``run(args) -> int`` (see :mod:`statevault.cli.common`), and list its ``register`` in COMMANDS.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from statevault._version import __version__
from statevault.cli import (
    deploy_cmd,
    diff_cmd,
    export_cmd,
    gc_cmd,
    import_cmd,
    inspect_cmd,
    ls_cmd,
    render,
    rm_cmd,
    verify_cmd,
)
from statevault.cli.common import ExitCode, Handler, exit_codes_epilog
from statevault.errors import CheckpointError, CorruptCheckpointError

if TYPE_CHECKING:
    from statevault.cli.common import Subparsers

COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    inspect_cmd.register,
    verify_cmd.register,
    ls_cmd.register,
    diff_cmd.register,
    rm_cmd.register,
    gc_cmd.register,
    export_cmd.register,
    import_cmd.register,
    deploy_cmd.register,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Example::

        status = main(["verify", "ckpt/step_000001000"])
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error: argparse already printed
        return _status_of(exc.code)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_usage(sys.stderr)
        print("statevault: error: choose a command (see statevault --help)", file=sys.stderr)
        return ExitCode.USAGE
    return run_handler(handler, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statevault",
        description=(
            "Inspect, verify, list, compare, clean up, export and import statevault checkpoints."
        ),
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"statevault {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def run_handler(handler: Handler, args: argparse.Namespace) -> int:
    """Call ``handler``; every failure becomes a message on stderr and its exit code."""
    try:
        return int(handler(args))
    except CheckpointError as exc:
        report_error(exc)
        return ExitCode.PROBLEMS if isinstance(exc, CorruptCheckpointError) else ExitCode.USAGE
    except BrokenPipeError:  # stdout closed early (`statevault inspect x | head`)
        _silence_stdout()
        return ExitCode.BROKEN_PIPE  # 128 + SIGPIPE, as a shell reports it
    except OSError as exc:
        report_error(exc)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except (SystemExit, GeneratorExit):
        raise
    # A BaseException that is not Python's own (torch's CheckpointException is one) would
    # otherwise end the process with status 1, which means "a damaged checkpoint".
    except BaseException:
        traceback.print_exc()
        report_error("unexpected internal error (a bug in statevault); please report it")
        return ExitCode.INTERNAL


def report_error(error: BaseException | str) -> None:
    """``statevault: error: <message>`` on stderr, then each problem a corrupt error lists."""
    console = render.error_console()
    console.print(render.text("statevault: error:", "bold red"), render.text(str(error)))
    if isinstance(error, CorruptCheckpointError) and error.problems != [str(error)]:
        for problem in error.problems:
            console.print(render.text(f"  - {problem}"))


def _status_of(code: str | int | None) -> int:
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return ExitCode.USAGE


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
