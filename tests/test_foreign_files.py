"""Nothing foreign is ever deleted: a manager, ``gc`` and ``rm`` delete only what statevault
provably wrote (its manifest, or the marker a save writes before its first shard), leave
everything else with a warning, and treat an error while deciding (EACCES, ESTALE) as "keep".
The leftovers of statevault's own interrupted deletions are still swept, through the marker."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

import statevault as sv
from statevault.checkpoint import commit
from tests.manager_helpers import child_env, save_steps, snapshot, step_dir


def _dcp_run(root: Path) -> dict[str, dict[str, bytes]]:
    """Two DCP checkpoints saved as ckpts/step_000000100 and ckpts/step_000000200 (what a user
    of torch.distributed.checkpoint names them), and what their files hold."""
    model = torch.nn.Linear(8, 4)
    for step in (100, 200):
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(root / f"step_{step:09d}"))
    return {name: snapshot(root / name) for name in ("step_000000100", "step_000000200")}


def _statevault(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "statevault.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )


def test_opening_a_manager_leaves_another_tools_checkpoints_with_a_warning(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    before = _dcp_run(root)
    with pytest.warns(UserWarning, match="step_000000100: not written by statevault"):
        sv.CheckpointManager(root).close()
    assert {name: snapshot(root / name) for name in before} == before
    with (
        pytest.warns(UserWarning, match="left alone"),
        sv.CheckpointManager(root, max_to_keep=1) as mgr,
    ):
        assert mgr.all_steps() == []
        assert mgr.restore() is None  # never tried as a checkpoint
        save_steps(mgr, [300, 400])  # retention runs: ours only
        assert mgr.all_steps() == [400]
    assert {name: snapshot(root / name) for name in before} == before


def test_a_save_onto_another_tools_step_directory_is_refused_and_moves_nothing(
    tmp_path: Path,
) -> None:
    root = tmp_path / "ckpts"
    before = _dcp_run(root)
    with pytest.warns(UserWarning, match="left alone"):
        mgr = sv.CheckpointManager(root)
    try:
        with pytest.raises(sv.CheckpointExistsError, match="not a statevault checkpoint"):
            mgr.save(100, {"w": np.ones(3)})
    finally:
        mgr.close()
    assert sorted(os.listdir(root)) == [".statevault.lock", "run.json", *sorted(before)]
    assert snapshot(root / "step_000000100") == before["step_000000100"]


def test_rm_and_gc_refuse_or_skip_another_tools_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    before = _dcp_run(root)
    with pytest.warns(UserWarning), sv.CheckpointManager(root) as mgr:
        save_steps(mgr, [300])  # makes ckpts a statevault run too
    by_step = _statevault("rm", root, "--step", "100", "--yes")
    assert by_step.returncode == 2 and "not written by statevault" in by_step.stderr
    by_path = _statevault("rm", root / "step_000000200", "--yes")
    assert by_path.returncode == 2 and "refusing to delete it" in by_path.stderr
    gc = _statevault("gc", root, "--yes", "--corrupt", "--json")
    assert gc.returncode == 0, gc.stderr
    document = json.loads(gc.stdout)
    assert document["items"] == []
    assert any("step_000000100" in note and "left alone" in note for note in document["notes"])
    assert {name: snapshot(root / name) for name in before} == before
    assert sv.verify(step_dir(root, 300)).ok


def _refuse(monkeypatch: pytest.MonkeyPatch, victim: Path, code: int) -> None:
    """Looking inside ``victim`` fails with ``code``, as for a directory of mode 000 (EACCES)
    or a stale NFS handle (ESTALE); its own entry in the run can still be stat'ed. (Tests run
    as root, whom permissions do not stop.)"""
    inside = str(victim) + os.sep

    def refused(path: Any, whole: bool) -> bool:
        text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
        return text.startswith(inside) or (whole and text == str(victim))

    for name, whole in (
        ("lstat", False),
        ("stat", False),
        ("listdir", True),
        ("open", True),
        ("scandir", True),
    ):
        original = getattr(os, name)

        def refusing(
            path: Any, *args: Any, _original: Any = original, _whole: bool = whole, **kwargs: Any
        ) -> Any:
            if refused(path, _whole):
                raise OSError(code, os.strerror(code), os.fspath(path))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(os, name, refusing)


@pytest.mark.parametrize("code", [errno.EACCES, errno.ESTALE], ids=["EACCES", "ESTALE"])
def test_a_step_that_cannot_be_read_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        save_steps(mgr, [1, 2, 3])
    victim = step_dir(run, 2)
    before = snapshot(victim)
    with monkeypatch.context() as patch:
        _refuse(patch, victim, code)
        with (
            pytest.warns(UserWarning, match="step_000000002: cannot be read"),
            sv.CheckpointManager(run, max_to_keep=1) as mgr,
        ):
            assert mgr.all_steps() == [1, 3]
            records = {r.step: r.status for r in mgr.checkpoints()}
            assert records[2] == "unreadable"
            save_steps(mgr, [4])  # retention: deletes 1 and 3, never 2
    assert snapshot(victim) == before
    assert sorted(os.listdir(run)).count("step_000000002") == 1
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        assert mgr.all_steps() == [2, 4]


def test_a_deletion_killed_after_its_manifest_is_still_swept_through_the_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        save_steps(mgr, [1, 2])
    original = commit.remove_checkpoint

    def killed_after_the_manifest(directory: Any) -> None:
        directory.storage.remove_file(directory.join("manifest.json").path)
        raise KeyboardInterrupt  # the process dies here: the rest stays on disk

    monkeypatch.setattr(commit, "remove_checkpoint", killed_after_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        commit.delete_committed(str(step_dir(run, 1)))
    monkeypatch.setattr(commit, "remove_checkpoint", original)
    leftover = [n for n in os.listdir(run) if n.startswith("step_000000001.tmp-")]
    assert len(leftover) == 1 and ".statevault-save" in os.listdir(run / leftover[0])
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        assert mgr.all_steps() == [2]
    assert not [n for n in os.listdir(run) if ".tmp-" in n], "swept: it carries the marker"


def test_a_legacy_incomplete_step_with_the_marker_is_swept_without_it_kept(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        save_steps(mgr, [1, 2, 3])
    (step_dir(run, 1) / "manifest.json").unlink()  # `rm` killed halfway: marker still there
    (step_dir(run, 2) / "manifest.json").unlink()
    (step_dir(run, 2) / ".statevault-save").unlink()  # no proof left: not ours to delete
    with (
        pytest.warns(UserWarning, match="step_000000002: not written by statevault"),
        sv.CheckpointManager(run, max_to_keep=None) as mgr,
    ):
        assert mgr.all_steps() == [3]
    assert not step_dir(run, 1).exists()
    assert step_dir(run, 2).is_dir()


def test_the_marker_is_written_before_the_first_shard_and_stays_in_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from statevault.engine import writer

    seen: list[list[str]] = []
    original = writer.write_file

    def watching(storage: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(sorted(os.listdir(os.path.dirname(path))))
        return original(storage, path, *args, **kwargs)

    monkeypatch.setattr(writer, "write_file", watching)
    sv.save({"a": np.ones(4), "b": np.zeros(3)}, tmp_path / "ckpt")
    assert seen and all(".statevault-save" in names for names in seen)
    marker = json.loads((tmp_path / "ckpt" / ".statevault-save").read_bytes())
    assert marker["writer"] == "statevault" and marker["pid"] == os.getpid()
    assert commit.ownership(sv_location(tmp_path / "ckpt")) == "ours"


def sv_location(path: Path) -> Any:
    from statevault.storage.location import resolve

    return resolve(path)


def test_a_sweep_aborts_only_statevaults_own_stale_uploads(s3_bucket: Any) -> None:
    """Open multipart uploads are invisible and billed: the manager aborts those a killed save
    of statevault's left, and never another tool's under the same prefix."""
    bucket = s3_bucket.url.split("://", 1)[1]
    keys = {
        "run/step_000000002/data-r00000-00000-0123abcd.safetensors": "ours",
        "run/step_000000003/weights.bin": "foreign",
        "run/other-tool/shard-0.bin": "foreign",
    }
    for key in keys:
        s3_bucket.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    run = f"{s3_bucket.url}/run"
    options = s3_bucket.storage_options
    with sv.CheckpointManager(
        run, storage_options=options, options=sv.RunOptions(stale_after_seconds=0)
    ):
        pass
    pending = set(s3_bucket.pending_multipart_uploads())
    assert pending == {key for key, whose in keys.items() if whose == "foreign"}
