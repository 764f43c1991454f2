"""The public API is curated, and importing statevault imports no framework."""

from __future__ import annotations

import re
import subprocess
import sys

import statevault as sv


def test_all_is_sorted_and_complete() -> None:
    assert sv.__all__ == sorted(sv.__all__)
    public = {name for name in vars(sv) if not name.startswith("_")}
    modules = {n for n in public if type(getattr(sv, n)).__name__ == "module"}
    assert public - modules == set(sv.__all__) - {"__version__"}


def test_error_tree() -> None:
    """Every exception class of the package is a CheckpointError (the errors a caller may get
    are one tree), every public one is in ``statevault.__all__``, and the README draws them
    all."""
    import importlib
    import inspect
    import pkgutil
    from pathlib import Path

    from statevault import errors

    for name in errors.__all__:
        error = getattr(errors, name)
        assert issubclass(error, sv.CheckpointError), name
        assert getattr(sv, name) is error, f"{name} is not in the public API"
    found = {}
    for module in pkgutil.walk_packages(sv.__path__, "statevault."):
        if module.name.endswith(
            (
                "__main__",
                "tf_adapter",
                "tf_state",
                "tf_workers",
                "keras",
                "source_tf",
                "lightning",
                "hf",
                "accelerate",
            )
        ):
            # Modules that import a framework (TensorFlow, Lightning, transformers, accelerate):
            # their errors are covered where the framework is imported; they define none.
            continue
        loaded = importlib.import_module(module.name)
        for name, value in vars(loaded).items():
            is_error = inspect.isclass(value) and issubclass(value, BaseException)
            if is_error and value.__module__ == module.name:
                found[f"{module.name}.{name}"] = value
    # Raised and caught inside statevault, each turned into a CheckpointError (or a line of the
    # diff's output) by its caller: never seen by a user.
    internal = {
        "statevault.engine.files.NotAFile",
        "statevault.format.geometry.GeometryError",
        "statevault.format.indexed.IndexFormatError",
        "statevault.format.rules.RuleError",
        "statevault.cli.diff_numeric.NoArithmetic",
    }
    outside = [n for n, e in found.items() if not issubclass(e, sv.CheckpointError)]
    assert sorted(outside) == sorted(internal), outside
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    tree = readme[readme.index("CheckpointError                 base") :]
    tree = tree[: tree.index("```")]
    drawn = {"CheckpointError", *re.findall(r"[├└]── (\w+Error)\b", tree)}
    assert drawn == set(errors.__all__), drawn ^ set(errors.__all__)


def test_import_does_not_import_frameworks() -> None:
    code = (
        "import sys, statevault, statevault.cli.main\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
