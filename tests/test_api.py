"""The public API is curated, and importing statevault imports no framework."""

from __future__ import annotations

import subprocess
import sys

import statevault as sv


def test_all_is_sorted_and_complete() -> None:
    assert sv.__all__ == sorted(sv.__all__)
    public = {name for name in vars(sv) if not name.startswith("_")}
    modules = {n for n in public if type(getattr(sv, n)).__name__ == "module"}
    assert public - modules == set(sv.__all__) - {"__version__"}


def test_error_tree() -> None:
    for error in (
        sv.CorruptCheckpointError,
        sv.CheckpointNotFoundError,
        sv.CheckpointExistsError,
        sv.StateMismatchError,
        sv.UnsupportedValueError,
        sv.UnsupportedFormatError,
    ):
        assert issubclass(error, sv.CheckpointError)


def test_import_does_not_import_frameworks() -> None:
    code = (
        "import sys, statevault, statevault.cli.main\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
