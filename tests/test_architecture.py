"""The structure DESIGN.md draws, checked on the source: units import one way only (lazy imports
inside functions count; ``TYPE_CHECKING`` imports do not), the top level holds only the
package's face, no module grows past 450 lines, and ``import statevault`` imports no framework.

A unit is a first-level subpackage or a top-level module of ``src/statevault``. Layers, from the
bottom (a unit may import only units of lower layers)::

    errors, _version            the exception tree, the version
    state                       Stateful, RNGState, PerRank
    format                      manifest, tree, dtypes, checksums, names, chunk geometry
    storage                     where bytes live (local, fsspec)
    adapters                    framework <-> arrays
    engine                      plans and execution: staging, writing, reading, resharding
    distributed                 torch.distributed glue: group, coordinator, DTensor, targets
    checkpoint                  the life of one checkpoint: open, save, load, verify, commit
    manager, interop            a run of checkpoints; other tools' formats
    integrations                Keras callback, framework glue
    cli, keras, lightning, hf,  the command line; thin public facades
    accelerate
    __init__                    the public API
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.manager_helpers import child_env

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "statevault"
LAYERS = [
    {"errors", "_version"},
    {"state"},
    {"format"},
    {"storage"},
    {"adapters"},
    {"engine"},
    {"distributed"},
    {"checkpoint"},
    {"manager", "interop"},
    {"integrations"},
    {"cli", "keras", "lightning", "hf", "accelerate"},
    {"__init__"},
]
FACE = {
    "__init__.py",
    "errors.py",
    "_version.py",
    "keras.py",
    "lightning.py",
    "hf.py",
    "accelerate.py",
    "py.typed",
}
MAX_LINES = 450
FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "lightning", "transformers", "accelerate")


def _layer(unit: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit in units)


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "statevault":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Every statevault module ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
        for inner in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import (the house style is absolute)"
            found.add(node.module or "")
            if node.module == "statevault":
                found.update(f"statevault.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("statevault")}


def _unit_edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _unit(_module_name(path))
        assert source is not None
        for module in _imported(path):
            target = _unit(module)
            if target is not None and target != source:
                edges[(source, target)].append(_module_name(path))
    return edges


def test_every_unit_has_a_layer() -> None:
    units = {_unit(_module_name(path)) for path in PACKAGE.rglob("*.py")}
    assert units <= set().union(*LAYERS), units - set().union(*LAYERS)


def test_units_import_only_lower_layers() -> None:
    upward = [
        f"{source} -> {target} (in {', '.join(sorted(set(modules)))})"
        for (source, target), modules in sorted(_unit_edges().items())
        if _layer(target) >= _layer(source)
    ]
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_the_unit_graph_has_no_cycle() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in _unit_edges():
        graph[source].add(target)
    state: dict[str, str] = {}

    def visit(unit: str, trail: list[str]) -> None:
        state[unit] = "open"
        for nxt in sorted(graph[unit]):
            assert state.get(nxt) != "open", "cycle: " + " -> ".join([*trail, unit, nxt])
            if nxt not in state:
                visit(nxt, [*trail, unit])
        state[unit] = "done"

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [])


def test_the_top_level_holds_only_the_packages_face() -> None:
    top = {p.name for p in PACKAGE.iterdir() if p.is_file()}
    assert top <= FACE, f"top-level modules beyond the face: {sorted(top - FACE)}"


def test_no_module_is_over_450_lines() -> None:
    long = {
        str(path.relative_to(PACKAGE)): count
        for path in PACKAGE.rglob("*.py")
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_importing_statevault_imports_no_framework() -> None:
    code = (
        "import sys, statevault, statevault.cli.main, statevault.checkpoint.save; "
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
