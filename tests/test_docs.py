"""Keep the docs honest: FORMAT.md's tables and worked example, the README's snippets, the demo.

- the worked example in docs/FORMAT.md is what the code writes for that state, byte for byte
  (but for the volatile parts of ``info``), and its literal manifest is a valid manifest;
- FORMAT.md's dtype table is ``statevault.format.dtypes``, row for row;
- FORMAT.md's tree-node table lists exactly the tags the decoder handles;
- every README snippet fenced as ```` ```python test ```` runs, on its own, in a fresh directory;
- ``examples/demo.py`` (what ``make demo`` runs) succeeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from statevault.format import dtypes, tree
from statevault.format.manifest import parse_manifest, serialize_manifest

ROOT = Path(__file__).resolve().parent.parent
FORMAT_MD = ROOT / "docs" / "FORMAT.md"
README = ROOT / "README.md"
DEMO = ROOT / "examples" / "demo.py"
DEMO_SUCCESS = "demo OK: resumed run is bit-identical to the uninterrupted run"

# info fields that differ from run to run (times, machine); so do the timings in info.save
# (every "<phase>_s" and the throughput). Everything else must match.
_VOLATILE_INFO = {"created", "created_unix", "versions"}


def fenced_blocks(text: str, info: str) -> list[str]:
    """The bodies of the code blocks whose fence info string is exactly ``info``."""
    pattern = re.compile(rf"^```{re.escape(info)}[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
    return [match.group(1) for match in pattern.finditer(text)]


def one_block(text: str, info: str) -> str:
    blocks = fenced_blocks(text, info)
    assert len(blocks) == 1, f"expected one ```{info} block, found {len(blocks)}"
    return blocks[0]


def table_after(text: str, header_cells: list[str]) -> list[list[str]]:
    """The body rows of the markdown table whose header row has exactly ``header_cells``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and _cells(line) == header_cells:
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            return rows
    raise AssertionError(f"no table with header {header_cells} in the document")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _unquote(cell: str) -> str:
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"expected a `code` cell, got {cell!r}"
    return match.group(1)


def _run_python(code: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    script = cwd / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, script.name],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


# -- FORMAT.md: the worked example ------------------------------------------------------------


@pytest.fixture(scope="module")
def format_md() -> str:
    return FORMAT_MD.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def worked_example(format_md: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the worked example's code as a script; returns the checkpoint it wrote."""
    workdir = tmp_path_factory.mktemp("worked-example")
    result = _run_python(one_block(format_md, "python worked-example"), workdir, timeout=120)
    assert result.returncode == 0, result.stderr
    return workdir / "ckpt"


def _stable(body: dict[str, Any]) -> dict[str, Any]:
    """The body without the info fields that change from run to run."""
    info = {k: v for k, v in body["info"].items() if k not in _VOLATILE_INFO}
    info["save"] = {
        k: v
        for k, v in info["save"].items()
        if not (k.endswith("_s") or k.startswith("throughput"))
    }
    return {**body, "info": info}


def test_worked_example_manifest_matches_the_code(format_md: str, worked_example: Path) -> None:
    documented = json.loads(one_block(format_md, "json manifest"))
    written = json.loads((worked_example / "manifest.json").read_text())
    assert {k: v for k, v in written.items() if k not in ("checksum", "body")} == {
        k: v for k, v in documented.items() if k not in ("checksum", "body")
    }
    # The info keys are all documented, and everything but times and versions is reproducible.
    assert written["body"]["info"].keys() == documented["body"]["info"].keys()
    assert written["body"]["info"]["save"].keys() == documented["body"]["info"]["save"].keys()
    assert _stable(written["body"]) == _stable(documented["body"])


def test_worked_example_manifest_is_byte_exact_and_valid(
    format_md: str, worked_example: Path
) -> None:
    documented = one_block(format_md, "json manifest").encode("ascii")
    manifest = parse_manifest(documented, "FORMAT.md")  # the checksum matches the pasted body
    assert serialize_manifest(manifest) == documented  # and the bytes are the writer's own
    written = parse_manifest((worked_example / "manifest.json").read_bytes(), "worked example")
    # Given the documented info (times, versions), the code writes exactly the documented bytes.
    assert serialize_manifest(dataclasses.replace(written, info=manifest.info)) == documented


def test_worked_example_shard_header_matches(format_md: str, worked_example: Path) -> None:
    shard = worked_example / "data-r00000-00000.safetensors"
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    documented = one_block(format_md, "json shard-header").rstrip("\n")
    assert data[8 : 8 + length].decode("ascii").rstrip(" ") == documented
    assert f"`N = {length}`" in format_md
    assert f"of {len(data)} bytes" in format_md


def test_worked_example_shard_opens_with_stock_safetensors(worked_example: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(
        str(worked_example / "data-r00000-00000.safetensors"), framework="np"
    ) as handle:
        assert handle.metadata() == {"format": "pt", "writer": "statevault"}
        assert list(handle.get_tensor("model/weight").ravel()) == [0.5, -1.0]


# -- FORMAT.md: the tables --------------------------------------------------------------------


def test_dtype_table_is_the_code_table(format_md: str) -> None:
    rows = table_after(format_md, ["name", "itemsize", "safetensors", "numpy"])
    documented = [
        (
            _unquote(name),
            int(itemsize),
            None if code == "—" else _unquote(code),
            None if numpy == "—" else _unquote(numpy),
        )
        for name, itemsize, code, numpy in rows
    ]
    in_code = [(d.name, d.itemsize, d.safetensors, d.numpy) for d in dtypes.DTYPES.values()]
    assert [row[0] for row in documented] == list(dtypes.DTYPES)
    assert documented == in_code


def test_tree_tag_table_is_the_decoder(format_md: str) -> None:
    rows = table_after(format_md, ["tag", "Python value", "members", "example"])
    documented = [_unquote(row[0]) for row in rows]
    assert len(documented) == len(set(documented)), "a tag is listed twice"
    assert set(documented) == set(tree._TAG_HANDLERS)


def test_tree_tag_examples_decode(format_md: str) -> None:
    """Every example in the tag table is a node the decoder accepts."""
    rows = table_after(format_md, ["tag", "Python value", "members", "example"])
    for row in rows:
        tag = _unquote(row[0])
        examples = re.findall(r"`(\{.*?\})`(?:,|$)", row[3])
        assert examples, f"no example for tag {tag}"
        for example in examples:
            node = json.loads(example)
            assert node["$"] == tag
            tree.decode(
                node,
                lambda index: f"tensor {index}",
                "FORMAT.md",
                resolve_sharded=lambda index: f"sharded {index}",
            )


# -- README ----------------------------------------------------------------------------------


def _readme_snippets() -> list[str]:
    return fenced_blocks(README.read_text(encoding="utf-8"), "python test")


def test_readme_has_tested_snippets() -> None:
    assert len(_readme_snippets()) >= 3


@pytest.mark.parametrize("index", range(len(_readme_snippets())))
def test_readme_snippet_runs(index: int, tmp_path: Path) -> None:
    snippet = _readme_snippets()[index]
    result = _run_python(snippet, tmp_path, timeout=180)
    assert result.returncode == 0, f"README snippet {index} failed:\n{snippet}\n{result.stderr}"


# -- the demo --------------------------------------------------------------------------------


def test_demo_runs_and_passes(tmp_path: Path) -> None:
    env = {**os.environ, "STATEVAULT_DEMO_DIR": str(tmp_path / "demo"), "COLUMNS": "120"}
    result = subprocess.run(
        [sys.executable, str(DEMO)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert DEMO_SUCCESS in output, output
    assert "bit-identical" in output


# -- regenerating the worked example ---------------------------------------------------------


def regenerate_worked_example() -> None:
    """Rewrite the literal blocks of FORMAT.md's worked example from what the code writes now.

    For an intended format change only: ``.venv/bin/python tests/test_docs.py --regenerate``,
    then review the diff of docs/FORMAT.md like any other change to the specification.
    """
    import tempfile

    text = FORMAT_MD.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        result = _run_python(one_block(text, "python worked-example"), workdir, timeout=120)
        if result.returncode != 0:
            raise SystemExit(result.stderr)
        manifest = (workdir / "ckpt" / "manifest.json").read_text(encoding="ascii")
        shard = (workdir / "ckpt" / "data-r00000-00000.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", shard[:8])
    header = shard[8 : 8 + length].decode("ascii").rstrip(" ")

    def block(info: str, content: str) -> None:
        nonlocal text
        pattern = re.compile(rf"(^```{re.escape(info)}[ \t]*\n)(.*?)(^```[ \t]*$)", re.M | re.S)
        text = pattern.sub(lambda m: m.group(1) + content + m.group(3), text, count=1)

    block("json manifest", manifest)
    block("json shard-header", header + "\n")
    text = re.sub(
        r"of \d+ bytes\. This is the complete", f"of {len(shard)} bytes. This is the complete", text
    )
    text = re.sub(r"`N = \d+`", f"`N = {length}`", text)
    FORMAT_MD.write_text(text, encoding="utf-8")
    print(f"rewrote the worked example in {FORMAT_MD}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        raise SystemExit("usage: python tests/test_docs.py --regenerate")
    regenerate_worked_example()
