"""The ``statevault`` command line: inspect and verify, their JSON, exit codes and messages."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import statevault as sv
from statevault.checkpoint import open_checkpoint
from statevault.cli import main as cli_main
from statevault.cli.common import EXIT_CODE_MEANINGS, ExitCode
from statevault.cli.main import main
from statevault.cli.render import format_shape, human_bytes, printable, to_json_value
from statevault.format.checksum import crc32c_of, format_checksum
from statevault.format.manifest import TensorEntry
from tests.progress_helpers import Recorder

CONSOLE_SCRIPT = Path(sys.executable).with_name("statevault")
LONG_KEY = "encoder/" + "/".join(f"block_{i:02d}" for i in range(20)) + "/attention.weight"
METADATA: dict[str, Any] = {
    "run": "demo-run",
    "lr": 3e-4,
    "tags": ("baseline", "cpu"),
    "step": 1200,
}

Run = Callable[..., tuple[int, str, str]]


def _trained_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # gives the optimizer state tensors (exp_avg, exp_avg_sq, step)
    return {
        "model": model,
        "optimizer": optimizer,
        "embedding": torch.randn(16, 4, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "mask": np.array([[True, False], [False, True]]),
        "positions": np.arange(10, dtype=np.int64),
        "histogram": np.linspace(0.0, 1.0, 7, dtype=np.float64),
        LONG_KEY: torch.ones(2, 2),
        "epoch": 3,
        "loss": 0.125,
        "labels": ["cat", "dog"],
    }


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "ck"
    sv.save(_trained_state(), path, metadata=METADATA)
    return path


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    """Run ``main`` in-process; returns (exit code, stdout, stderr)."""

    def invoke(*argv: str | Path) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


def _entries(path: Path) -> list[TensorEntry]:
    return open_checkpoint(path).manifest.tensors


def _flip_byte(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def _write_manifest_body(path: Path, body: dict[str, Any]) -> None:
    """A manifest with a valid checksum around ``body`` (NaN allowed, as a hostile writer might)."""
    body_bytes = json.dumps(body).encode()
    checksum = format_checksum(crc32c_of(body_bytes))
    head = f'{{"format":"statevault","format_version":1,"checksum":"{checksum}","body":'
    (path / "manifest.json").write_bytes(head.encode() + body_bytes + b"}\n")


def _rewrite_manifest(path: Path, old: bytes, new: bytes) -> None:
    manifest = path / "manifest.json"
    data = manifest.read_bytes()
    assert old in data
    manifest.write_bytes(data.replace(old, new, 1))


# inspect --------------------------------------------------------------------------------------


def test_inspect_shows_every_leaf_with_dtype_and_shape(checkpoint: Path, run: Run) -> None:
    code, out, err = run("inspect", checkpoint)
    assert (code, err) == (0, "")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    entries = _entries(checkpoint)
    assert {"model/0.weight", "optimizer/state/0/exp_avg", "mask", LONG_KEY} <= {
        e.path for e in entries
    }
    for entry in entries:
        row = rows[entry.path]  # the key path starts a line of its own, whole, never wrapped
        assert entry.framework in row and entry.dtype in row and entry.file in row
        assert format_shape(entry.shape) in " ".join(row)
        assert human_bytes(entry.nbytes) in " ".join(row)


def test_inspect_shows_metadata_and_save_info(checkpoint: Path, run: Run) -> None:
    code, out, _ = run("inspect", checkpoint)
    info = open_checkpoint(checkpoint).manifest.info
    assert code == 0
    assert "demo-run" in out and "('baseline', 'cpu')" in out and "1200" in out
    assert info["created"] in out
    assert f"torch {torch.__version__}" in out
    assert re.search(r"^Save .*write \d", out, re.MULTILINE)
    tensor_count = len(_entries(checkpoint))
    assert f"Total: {tensor_count} tensors" in out


def test_inspect_json_matches_the_manifest(checkpoint: Path, run: Run) -> None:
    code, out, err = run("inspect", "--json", checkpoint)
    assert (code, err) == (0, "")
    doc = json.loads(out)
    manifest = open_checkpoint(checkpoint).manifest
    assert [
        (t["path"], t["framework"], t["dtype"], t["shape"], t["nbytes"]) for t in doc["tensors"]
    ] == [(e.path, e.framework, e.dtype, list(e.shape), e.nbytes) for e in manifest.tensors]
    assert [(t["file"], t["offset"], t["checksum"]) for t in doc["tensors"]] == [
        (e.file, e.offset, e.checksum) for e in manifest.tensors
    ]
    assert [f["name"] for f in doc["files"]] == [f.name for f in manifest.files]
    assert [f["size"] for f in doc["files"]] == [f.size for f in manifest.files]
    assert doc["metadata"] == {**METADATA, "tags": list(METADATA["tags"])}
    assert doc["info"] == manifest.info
    assert doc["path"] == str(checkpoint)
    assert doc["totals"] == {
        "tensors": len(manifest.tensors),
        "tensor_bytes": sum(e.nbytes for e in manifest.tensors),
        "files": len(manifest.files),
        "file_bytes": manifest.total_bytes(),
    }


def test_inspect_reads_no_tensor_payload(checkpoint: Path, run: Run) -> None:
    for shard in checkpoint.glob("*.safetensors"):
        shard.write_bytes(b"")  # inspect must not notice: it reads manifest.json only
    code, out, _ = run("inspect", checkpoint)
    assert code == 0 and LONG_KEY in out


def test_inspect_escapes_hostile_key_paths(tmp_path: Path, run: Run) -> None:
    path = tmp_path / "hostile"
    sv.save({"\x1b[2Jevil": torch.zeros(1), "[bold]markup[/bold]": torch.zeros(1)}, path)
    code, out, _ = run("inspect", path)
    assert code == 0
    assert "\x1b" not in out and "\\x1b[2Jevil" in out
    assert "[bold]markup[/bold]" in out


def test_inspect_damaged_manifest_exits_1_without_traceback(checkpoint: Path, run: Run) -> None:
    _rewrite_manifest(checkpoint, b'"demo-run"', b'"demo-rum"')
    code, out, err = run("inspect", checkpoint)
    assert (code, out) == (ExitCode.PROBLEMS, "")
    assert "manifest.json checksum mismatch" in err and "Traceback" not in err


# verify ---------------------------------------------------------------------------------------


def test_verify_sound_checkpoint_exits_0_with_one_line(checkpoint: Path, run: Run) -> None:
    code, out, err = run("verify", checkpoint)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("OK ") and str(checkpoint) in lines[0]
    assert f"{len(_entries(checkpoint))} tensors" in lines[0]


def test_verify_json_on_sound_checkpoint(checkpoint: Path, run: Run) -> None:
    code, out, _ = run("verify", "--json", checkpoint)
    entries = _entries(checkpoint)
    assert code == 0
    assert json.loads(out) == {
        "path": str(checkpoint),
        "ok": True,
        "files": len(open_checkpoint(checkpoint).manifest.files),
        "tensors": len(entries),
        "bytes_checked": sum(e.nbytes for e in entries),
        "problems": [],
    }


@pytest.mark.parametrize("key", ["model/2.weight", "optimizer/state/0/exp_avg_sq", LONG_KEY])
def test_verify_names_the_tensor_whose_byte_flipped(checkpoint: Path, run: Run, key: str) -> None:
    entry = next(e for e in _entries(checkpoint) if e.path == key)
    _flip_byte(checkpoint / entry.file, entry.offset + entry.nbytes // 2)
    code, out, _ = run("verify", checkpoint)
    assert code == ExitCode.PROBLEMS
    assert out.startswith("DAMAGED") and f"tensor {key} in {entry.file}" in out
    others = [e.path for e in _entries(checkpoint) if e.path != key]
    assert not any(f"tensor {other} " in out for other in others)
    code, out, _ = run("verify", "--json", checkpoint)
    doc = json.loads(out)
    assert (code, doc["ok"]) == (1, False)
    assert doc["problems"] == [f"tensor {key} in {entry.file}: checksum mismatch"]


def test_verify_names_a_truncated_shard(checkpoint: Path, run: Run) -> None:
    shard = checkpoint / _entries(checkpoint)[0].file
    with shard.open("r+b") as handle:
        handle.truncate(shard.stat().st_size - 10)
    code, out, _ = run("verify", checkpoint)
    assert code == ExitCode.PROBLEMS
    assert f"file {shard.name}" in out and "truncated" in out


def test_verify_names_a_missing_shard(checkpoint: Path, run: Run) -> None:
    shard = checkpoint / _entries(checkpoint)[0].file
    shard.unlink()
    code, out, _ = run("verify", "--json", checkpoint)
    assert code == ExitCode.PROBLEMS
    assert any(shard.name in problem for problem in json.loads(out)["problems"])


def test_verify_damaged_manifest_exits_1(checkpoint: Path, run: Run) -> None:
    _rewrite_manifest(checkpoint, b'"demo-run"', b'"demo-rum"')
    code, out, _ = run("verify", checkpoint)
    assert code == ExitCode.PROBLEMS and "manifest.json checksum mismatch" in out


# exit code 2 and the parser -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "verify"])
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_missing_checkpoint_exits_2(
    tmp_path: Path, run: Run, command: str, json_flag: list[str]
) -> None:
    code, out, err = run(command, *json_flag, tmp_path / "nothing-here")
    assert (code, out) == (ExitCode.USAGE, "")
    assert "no committed checkpoint at" in err and "nothing-here" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_newer_format_version_exits_2(checkpoint: Path, run: Run, command: str) -> None:
    _rewrite_manifest(checkpoint, b'"format_version":1,', b'"format_version":99,')
    code, _, err = run(command, checkpoint)
    assert code == ExitCode.USAGE and "upgrade statevault" in err


def test_unsupported_storage_scheme_exits_2(run: Run) -> None:
    code, _, err = run("verify", "nosuchscheme://bucket/ck")
    assert code == ExitCode.USAGE and "nosuchscheme://" in err


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["inspect"], ["verify", "--bogus", "x"]])
def test_usage_errors_exit_2(run: Run, argv: list[str]) -> None:
    code, out, err = run(*argv)
    assert (code, out) == (ExitCode.USAGE, "")
    assert "usage: statevault" in err


def test_help_lists_commands_and_exit_codes(run: Run) -> None:
    code, out, _ = run("--help")
    assert code == 0
    assert "inspect" in out and "verify" in out
    for exit_code, meaning in EXIT_CODE_MEANINGS.items():
        assert re.search(rf"^\s*{int(exit_code)}\s+{re.escape(meaning)}$", out, re.MULTILINE)


def test_module_docstring_documents_the_same_exit_codes() -> None:
    doc = cli_main.__doc__ or ""
    for exit_code, meaning in EXIT_CODE_MEANINGS.items():
        assert re.search(rf"^\s*{int(exit_code)}\s+{re.escape(meaning)}$", doc, re.MULTILINE)


def test_version(run: Run) -> None:
    code, out, _ = run("--version")
    assert (code, out.strip()) == (0, f"statevault {sv.__version__}")


@pytest.mark.parametrize(
    ("error", "expected", "message"),
    [
        (RuntimeError("boom"), ExitCode.INTERNAL, "a bug in statevault"),
        (PermissionError(13, "Permission denied", "/x"), ExitCode.USAGE, "Permission denied"),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED, ""),
    ],
)
def test_other_failures_never_exit_1(
    checkpoint: Path,
    run: Run,
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
    expected: ExitCode,
    message: str,
) -> None:
    def broken(path: object, **options: object) -> object:
        raise error

    monkeypatch.setattr("statevault.cli.verify_cmd.verify", broken)
    code, _, err = run("verify", checkpoint)
    assert code == expected and message in err


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@example(info={"save": {"total_s": math.nan}, "x": math.inf, "created": 7}, meta=None)
@example(info={"versions": ["not", "a", "dict"]}, meta={"$": "tensor", "id": 0})
@example(info={}, meta={"$": "dict", "items": [[{"$": "tuple", "items": [1]}, b"x".hex()]]})
@given(
    info=st.dictionaries(st.sampled_from(["created", "versions", "save", "x"]), _JSON), meta=_JSON
)
def test_inspect_survives_hostile_info_and_metadata(
    checkpoint: Path, run: Run, info: dict[str, Any], meta: Any
) -> None:
    body = json.loads((checkpoint / "manifest.json").read_bytes())["body"]
    _write_manifest_body(checkpoint, {**body, "info": info, "metadata": meta})
    for argv in (["inspect"], ["inspect", "--json"]):
        code, out, err = run(*argv, checkpoint)
        assert code in (ExitCode.OK, ExitCode.PROBLEMS), err
        assert "Traceback" not in err
        if code == ExitCode.OK and argv[-1] == "--json":
            json.loads(out)


# render helpers -------------------------------------------------------------------------------


def test_render_helpers() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**30)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 GiB",
    ]
    assert (format_shape(()), format_shape((2, 3))) == ("[]", "[2, 3]")
    assert printable("a\x1b[0m\u202eb") == "a\\x1b[0m\\u202eb"
    assert to_json_value({1: (b"\x00", float("nan"), np.float32(0.5), 1 + 2j)}) == {
        "1": ["AA==", "nan", 0.5, [1.0, 2.0]]
    }


# the installed console script, out of process -------------------------------------------------


def _console(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f"console script not installed at {CONSOLE_SCRIPT} (pip install -e .)")
    env = {**os.environ, "COLUMNS": "40"}  # a narrow width must not wrap piped output
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_console_script_exit_codes_and_output(checkpoint: Path, tmp_path: Path) -> None:
    inspected = _console("inspect", checkpoint)
    assert inspected.returncode == 0, inspected.stderr
    assert any(line.startswith(LONG_KEY + " ") for line in inspected.stdout.splitlines())
    as_json = _console("inspect", "--json", checkpoint)
    assert as_json.returncode == 0
    assert [t["path"] for t in json.loads(as_json.stdout)["tensors"]] == [
        e.path for e in _entries(checkpoint)
    ]
    assert _console("verify", checkpoint).returncode == 0
    missing = _console("verify", tmp_path / "absent")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    entry = _entries(checkpoint)[0]
    _flip_byte(checkpoint / entry.file, entry.offset)
    damaged = _console("verify", checkpoint)
    assert damaged.returncode == 1 and f"tensor {entry.path} " in damaged.stdout


@pytest.mark.parametrize("argv", [["inspect"], ["verify"], ["inspect", "--json"]])
def test_closed_stdout_exits_141_quietly(checkpoint: Path, argv: list[str]) -> None:
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f"console script not installed at {CONSOLE_SCRIPT} (pip install -e .)")
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `statevault inspect ck | head` once head has exited
    try:
        result = subprocess.run(
            [str(CONSOLE_SCRIPT), *argv, str(checkpoint)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.returncode == ExitCode.BROKEN_PIPE
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_cli_never_imports_torch(checkpoint: Path) -> None:
    code = (
        "import sys\n"
        "from statevault.cli.main import main\n"
        f"assert main(['inspect', {str(checkpoint)!r}]) == 0\n"
        f"assert main(['verify', {str(checkpoint)!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'the CLI imported torch'\n"
        "assert 'tensorflow' not in sys.modules, 'the CLI imported tensorflow'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_verify_reports_progress_in_bytes(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import statevault.checkpoint.verify

    monkeypatch.setattr(
        statevault.checkpoint.verify, "VERIFY_BATCH_BYTES", 64
    )  # many small batches
    recorder = Recorder()
    report = sv.verify(checkpoint, progress=recorder)
    assert report.ok and recorder.totals == [report.bytes_checked]
    assert len(recorder.advances) > 3 and sum(recorder.advances) == report.bytes_checked
    recorder = Recorder()
    subtree = sv.verify(checkpoint, only="model", progress=recorder)
    assert recorder.totals == [subtree.bytes_checked] < [report.bytes_checked]
    assert sum(recorder.advances) == subtree.bytes_checked
    entry = _entries(checkpoint)[-1]
    _flip_byte(checkpoint / entry.file, entry.offset)
    damaged = sv.verify(checkpoint, progress=Recorder())
    assert [p for p in damaged.problems if entry.path in p]  # batching still names the tensor
