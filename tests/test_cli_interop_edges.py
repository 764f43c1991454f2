"""The edges of ``statevault import``, ``export`` and ``ls`` as a user meets them, end to end in a
subprocess: exit codes, one clear line on stderr, no traceback, no escape sequences, no leaked
torch warnings or log records, nothing unpickled without an explicit ``--from dcp``, and a
directory in the way of an export left untouched."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import statevault as sv

# Variables that make rich colour a pipe; removed so that "not a terminal" means what it says.
_COLOUR_FORCING = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CLICOLOR_FORCE")


def _cli(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in _COLOUR_FORCING}
    return subprocess.run(
        [sys.executable, "-m", "statevault.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=180,
        check=False,
    )


def _assert_one_clean_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, and stderr is exactly one ``statevault: error:`` line holding every needle, with
    no traceback, no warning, no escape sequence (raw or spelled out)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("statevault: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, result.stderr)
    for unwanted in ("Traceback", "Warning", "\x1b", "\\x1b"):
        assert unwanted not in result.stderr, (unwanted, result.stderr)


def _dcp_save(state: dict[str, object], path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=str(path))


# ---- import: DCP ------------------------------------------------------------------------------


def test_damaged_dcp_data_is_one_line_exit_2_naming_the_source(tmp_path: Path) -> None:
    _dcp_save({"model": torch.nn.Linear(4, 3).state_dict()}, tmp_path / "dcp")
    for data in (tmp_path / "dcp").glob("*.distcp"):
        os.truncate(data, 10)
    result = _cli("import", "dcp", "--from", "dcp", "--to", "out", cwd=tmp_path)
    _assert_one_clean_error_line(result, "dcp", "DCP")
    assert not (tmp_path / "out").exists()


def test_damaged_dcp_metadata_prints_no_torch_log_records(tmp_path: Path) -> None:
    _dcp_save({"w": torch.ones(3)}, tmp_path / "dcp")
    (tmp_path / "dcp" / ".metadata").write_bytes(b"\x80\x04garbage")
    result = _cli("import", "dcp", "--from", "dcp", "--to", "out", cwd=tmp_path)
    _assert_one_clean_error_line(result, "dcp", "metadata")
    assert "Global metadata is not found" not in result.stderr
    assert not (tmp_path / "out").exists()


class _Planted:
    """A pickle that creates a directory when it is loaded: proof that something unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def test_dcp_is_never_detected_its_pickle_never_loaded(tmp_path: Path) -> None:
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    marker = tmp_path / "pickle-ran"
    (hostile / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    result = _cli("import", "hostile", "--to", "out", cwd=tmp_path)
    _assert_one_clean_error_line(result, "hostile", "pickle", "--from dcp")
    assert not marker.exists(), "detection unpickled DCP's .metadata"
    assert not (tmp_path / "out").exists()

    _dcp_save({"w": torch.arange(5.0)}, tmp_path / "dcp")
    refused = _cli("import", "dcp", "--to", "out", cwd=tmp_path)
    _assert_one_clean_error_line(refused, "pickle", "--from dcp")
    trusted = _cli("import", "dcp", "--from", "dcp", "--to", "out", "--json", cwd=tmp_path)
    assert trusted.returncode == 0, trusted.stderr
    assert json.loads(trusted.stdout)["from"] == "dcp" and trusted.stderr == ""
    assert torch.equal(sv.load(tmp_path / "out")["w"], torch.arange(5.0))


# ---- import: torch files ----------------------------------------------------------------------


def test_torch_refusal_has_no_escape_sequences_and_names_the_reason(tmp_path: Path) -> None:
    # torch's own message for this file holds "\x1b[1m...\x1b[0m"
    torch.save({"w": torch.ones(2), "n": np.ones(2)}, tmp_path / "np.pt")
    result = _cli("import", "np.pt", "--to", "out", cwd=tmp_path)
    _assert_one_clean_error_line(result, "np.pt", "weights_only", "numpy")


def test_torchscript_archive_leaks_no_warning_and_says_what_it_is(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "script.pt")
    result = _cli("import", "script.pt", "--from", "torch", "--to", "out", cwd=tmp_path)
    _assert_one_clean_error_line(result, "script.pt", "TorchScript")
    assert not (tmp_path / "out").exists()


def test_torch_warning_on_a_failed_read_is_folded_into_the_error(tmp_path: Path) -> None:
    # protocol 4 makes torch warn, then refuse: the warning explains the refusal
    torch.save({"w": torch.ones(2)}, tmp_path / "p4.pt", pickle_protocol=4)
    result = _cli("import", "p4.pt", "--to", "out", cwd=tmp_path)
    _assert_one_clean_error_line(result, "p4.pt", "pickle protocol 4")


# ---- ls ---------------------------------------------------------------------------------------


def test_ls_of_a_missing_path_says_it_does_not_exist(tmp_path: Path) -> None:
    missing = _cli("ls", "nonexistent", cwd=tmp_path)
    _assert_one_clean_error_line(missing, "nonexistent", "does not exist")
    assert "no statevault run" not in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = _cli("ls", "empty", cwd=tmp_path)
    _assert_one_clean_error_line(empty, "no statevault run")


# ---- export -----------------------------------------------------------------------------------


@pytest.fixture
def small_ckpt(tmp_path: Path) -> Path:
    sv.save({"model": torch.nn.Linear(3, 2), "optimizer": {"m": torch.zeros(2)}}, tmp_path / "c")
    return tmp_path / "c"


def test_export_overwrite_onto_a_directory_is_refused_and_leaves_it(
    small_ckpt: Path, tmp_path: Path
) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        result = _cli("export", small_ckpt, "--to", "precious", *extra, cwd=tmp_path)
        _assert_one_clean_error_line(result, str(target), "is a directory")
        assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
        assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "precious"]  # no leftovers


def test_max_shard_size_without_hf_is_a_usage_error(small_ckpt: Path, tmp_path: Path) -> None:
    result = _cli(
        "export", small_ckpt, "--to", "m.safetensors", "--max-shard-size", "1KB", cwd=tmp_path
    )
    _assert_one_clean_error_line(result, "--max-shard-size", "--format hf")
    assert not (tmp_path / "m.safetensors").exists()


def test_hf_export_of_several_subtrees_lists_them_and_suggests_only(
    small_ckpt: Path, tmp_path: Path
) -> None:
    result = _cli("export", small_ckpt, "--to", "hf", "--format", "hf", cwd=tmp_path)
    _assert_one_clean_error_line(result, "model", "optimizer", "--only model")
    assert not (tmp_path / "hf").exists()
    chosen = _cli(
        "export", small_ckpt, "--to", "hf", "--format", "hf", "--only", "model", cwd=tmp_path
    )
    assert chosen.returncode == 0 and chosen.stderr == "", chosen.stderr
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["bias", "weight"]


def test_json_output_draws_no_progress_bar(small_ckpt: Path, tmp_path: Path) -> None:
    result = _cli("export", small_ckpt, "--to", "m.safetensors", "--json", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert json.loads(result.stdout)["tensors"] == 3


# ---- the CLI's last line of defence -----------------------------------------------------------


def test_a_stray_base_exception_exits_3_not_1(capsys: pytest.CaptureFixture[str]) -> None:
    """A library's BaseException (torch's CheckpointException is one) that escaped its caller
    is a bug: exit 3 with a traceback, never 1 ("a damaged checkpoint") or a crash."""
    import argparse

    from statevault.cli.common import ExitCode
    from statevault.cli.main import run_handler

    class Foreign(BaseException):
        pass

    def handler(args: argparse.Namespace) -> int:
        raise Foreign("from a library")

    assert run_handler(handler, argparse.Namespace()) == ExitCode.INTERNAL
    err = capsys.readouterr().err
    assert "Foreign: from a library" in err and "a bug in statevault" in err
