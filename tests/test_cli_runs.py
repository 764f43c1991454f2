"""The run commands of the CLI: ``ls``, ``diff``, ``rm`` and ``gc``, on real runs made by the
CheckpointManager; in-process through ``main`` and through the installed console script."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

import statevault as sv
from statevault.checkpoint import open_checkpoint
from statevault.checkpoint.commit import marker_bytes
from statevault.cli import runs
from statevault.cli.main import main
from statevault.format.names import MANIFEST_NAME
from statevault.manager.naming import LOCK_FILE
from tests.manager_helpers import child_env, damage_manifest, save_steps, snapshot, step_dir

CONSOLE_SCRIPT = Path(sys.executable).with_name("statevault")
TMP_NAME = "step_000000099.tmp-deadbeef"

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Run:
    """Run ``main`` in-process; returns (exit code, stdout, stderr)."""

    def invoke(*argv: str | Path) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


def cli_json(cli: Run, *argv: str | Path, expect: int = 0) -> Any:
    code, out, err = cli(*argv, "--json")
    assert code == expect, err
    return json.loads(out)


def console_script(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )


# ---- runs made by the manager -----------------------------------------------------------------

LOSSES = {10: 0.9, 20: 0.5, 30: 0.7, 40: 0.6}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run of four committed checkpoints with a loss each; step 20 annotated later."""
    path = tmp_path / "runs" / "exp1"
    config = sv.RunOptions(metadata={"lr": 0.1})
    with sv.CheckpointManager(path, max_to_keep=None, options=config) as mgr:
        save_steps(mgr, LOSSES, {s: {"loss": loss} for s, loss in LOSSES.items()})
        mgr.annotate(20, {"val_acc": 0.91})
    return path


@pytest.fixture
def live(run_dir: Path) -> Iterator[sv.CheckpointManager]:
    """A live manager holding the run's writer lock."""
    mgr = sv.CheckpointManager(run_dir, max_to_keep=None, save_on_preemption=False)
    yield mgr
    mgr.close()


def make_temporary(run: Path) -> Path:
    """A save that died: its marker (written first), then part of a shard."""
    tmp = run / TMP_NAME
    tmp.mkdir()
    (tmp / ".statevault-save").write_bytes(marker_bytes())
    (tmp / "data-r00000-00000.safetensors").write_bytes(b"\0" * 64)
    return tmp


def make_incomplete(run: Path, source_step: int, step: int) -> Path:
    """A step directory without its manifest: the leftover of a deletion that died."""
    target = step_dir(run, step)
    shutil.copytree(step_dir(run, source_step), target)
    (target / MANIFEST_NAME).unlink()
    return target


def make_corrupt(run: Path, source_step: int, step: int) -> Path:
    target = step_dir(run, step)
    shutil.copytree(step_dir(run, source_step), target)
    damage_manifest(target)
    return target


def files_of(run: Path) -> dict[str, bytes]:
    """Every file of a run but the writer lock (whose heartbeat a live manager rewrites)."""
    return {name: data for name, data in snapshot(run).items() if name != LOCK_FILE}


def flip_tensor_byte(checkpoint: str | Path, key_path: str) -> None:
    """Flip the first byte of one tensor's payload (its checksum no longer matches)."""
    entry = next(t for t in open_checkpoint(checkpoint).manifest.tensors if t.path == key_path)
    shard = Path(checkpoint) / entry.file
    data = bytearray(shard.read_bytes())
    data[entry.offset] ^= 0xFF
    shard.write_bytes(bytes(data))


def rows_by_step(out: str) -> dict[int, str]:
    rows = {}
    for line in out.splitlines():
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if first.isdigit():
            rows[int(first)] = line
    return rows


# ---- ls ---------------------------------------------------------------------------------------


def test_ls_run_lists_every_step_with_metrics_status_and_temporaries(
    run_dir: Path, cli: Run
) -> None:
    damage_manifest(step_dir(run_dir, 30))
    make_temporary(run_dir)
    code, out, err = cli("ls", run_dir)
    assert (code, err) == (0, "")
    rows = rows_by_step(out)
    assert sorted(rows) == [10, 20, 30, 40]
    for step in (10, 20, 40):
        assert f"loss={LOSSES[step]}" in rows[step] and "committed" in rows[step]
        assert re.search(r"sync \d+(\.\d)? [µm]?s, [\d.]+ [KMG]?i?B/s", rows[step])
    assert "val_acc=0.91" in rows[20]  # annotations merged with the save's metrics
    assert "corrupt: manifest.json" in rows[30]
    assert TMP_NAME in out and "leftover of an interrupted save" in out
    assert "exp1" in out and "{'lr': 0.1}" in out and "Sessions" in out


def test_ls_json_matches_the_manager(run_dir: Path, cli: Run) -> None:
    damage_manifest(step_dir(run_dir, 30))
    temporary_bytes = sum(f.stat().st_size for f in make_temporary(run_dir).iterdir())
    doc = cli_json(cli, "ls", run_dir)
    with sv.CheckpointManager(run_dir, max_to_keep=None, save_on_preemption=False) as mgr:
        all_steps, run_id = mgr.all_steps(), mgr.run_id
        restored = mgr.restore()
        doc_live = cli_json(cli, "ls", run_dir)
    committed = [c["step"] for c in doc["checkpoints"] if c["status"] == "committed"]
    assert committed == all_steps == [10, 20, 40]
    assert doc["kind"] == "run" and doc["run"]["run_id"] == run_id
    assert doc["run"]["config"] == {"lr": 0.1} and doc["run"]["sessions"] == 1
    by_step = {c["step"]: c for c in doc["checkpoints"]}
    assert by_step[20]["metrics"] == {"loss": 0.5, "val_acc": 0.91}
    assert by_step[30]["status"] == "corrupt" and "manifest.json" in by_step[30]["problem"]
    save = by_step[10]["save"]
    assert save["mode"] == "sync" and {"blocked_s", "write_s", "total_s", "write_gib_s"} <= set(
        save
    )
    assert all(c["kept_because"] is None for c in doc["checkpoints"])  # no policy given
    assert doc["temporaries"] == [
        {
            "name": TMP_NAME,
            "path": str(run_dir / TMP_NAME),
            "kind": "temporary",
            "state": "leftover of an interrupted save",
            "bytes": temporary_bytes,
        }
    ]
    # The manager swept the leftover on start; the live run now has a second session.
    assert doc_live["temporaries"] == [] and doc_live["run"]["sessions"] == 2
    assert doc_live["writer"] == {"host": socket.gethostname(), "pid": os.getpid()}
    assert restored is not None and restored.step == 40
    (lineage,) = doc_live["run"]["lineage"]
    assert lineage["session"] == 2 and lineage["resumed_from"] == {"run_id": run_id, "step": 40}
    code, out, _ = cli("ls", run_dir)
    assert code == 0 and "session 2: resumed from step 40" in out


def test_ls_shows_how_long_an_async_save_blocked(tmp_path: Path, cli: Run) -> None:
    with sv.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        save_steps(mgr, [1])
    (row,) = cli_json(cli, "ls", tmp_path / "run")["checkpoints"]
    assert row["save"]["mode"] == "async" and row["save"]["blocked_s"] <= row["save"]["total_s"]
    code, out, _ = cli("ls", tmp_path / "run")
    assert code == 0 and re.search(r"async blocked \S+ [µm]?s of \S+ [µm]?s", rows_by_step(out)[1])


def test_ls_shows_why_each_checkpoint_is_kept(run_dir: Path, cli: Run) -> None:
    doc = cli_json(cli, "ls", run_dir, "--keep-last", "1", "--best-metric", "loss")
    kept = {c["step"]: c["kept_because"] for c in doc["checkpoints"]}
    assert kept == {
        10: [],
        20: ["best loss (min)"],
        30: [],
        40: ["newest", "latest 1"],
    }
    assert doc["retention"] == "latest 1, best 1 by loss (min)"
    code, out, _ = cli("ls", run_dir, "--max-to-keep", "1")
    assert code == 0 and "not kept: the policy would delete it" in rows_by_step(out)[10]


def test_ls_root_lists_runs_with_latest_and_best(tmp_path: Path, cli: Run) -> None:
    root = tmp_path / "runs"
    with sv.CheckpointManager(root / "a", max_to_keep=None) as mgr:
        metrics = {1: {"loss": 3.0, "acc": 0.1}, 2: {"loss": 1.0, "acc": 0.5}}
        save_steps(mgr, [1, 2, 3], {**metrics, 3: {"loss": 2.0, "acc": 0.4}})
    with sv.CheckpointManager(
        root / "b", max_to_keep=None, options=sv.RunOptions(name="second")
    ) as mgr:
        save_steps(mgr, [5, 7], {5: {"loss": 0.5, "acc": 0.9}, 7: {"loss": 0.25, "acc": 0.8}})
    (root / "notes").mkdir()  # not a run: not listed
    doc = cli_json(cli, "ls", root)
    assert doc["kind"] == "root"
    runs = {r["name"]: r for r in doc["runs"]}
    assert sorted(runs) == ["a", "second"]
    assert (runs["a"]["checkpoints"], runs["a"]["latest_step"]) == (3, 3)
    assert runs["a"]["best"] == {"metric": "loss", "mode": "min", "value": 1.0, "step": 2}
    assert (runs["second"]["checkpoints"], runs["second"]["latest_step"]) == (2, 7)
    assert runs["second"]["best"]["step"] == 7 and runs["second"]["path"] == str(root / "b")
    by_acc = cli_json(cli, "ls", root, "--metric", "acc", "--mode", "max")
    best = {r["name"]: r["best"] for r in by_acc["runs"]}
    assert (best["a"]["step"], best["a"]["value"]) == (2, 0.5)
    assert (best["second"]["step"], best["second"]["value"]) == (5, 0.9)
    code, out, _ = cli("ls", root)
    assert code == 0 and "loss=1 (min) at step 2" in out and "second" in out


def test_ls_works_while_another_manager_holds_the_lock(
    run_dir: Path, live: sv.CheckpointManager, cli: Run
) -> None:
    live.save(50, {"w": np.ones(4, dtype=np.float32)}, metrics={"loss": 0.1})
    result = console_script("ls", "--json", run_dir)  # another process than the lock's holder
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [c["step"] for c in doc["checkpoints"]] == live.all_steps() == [10, 20, 30, 40, 50]
    assert doc["writer"]["pid"] == os.getpid()
    code, out, _ = cli("ls", run_dir)
    assert code == 0 and f"pid {os.getpid()}" in out
    assert live.save(60, {"w": np.ones(4, dtype=np.float32)})  # the lock is still the manager's


def test_ls_refuses_what_is_not_a_run(tmp_path: Path, run_dir: Path, cli: Run) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = cli("ls", tmp_path / "empty")
    assert code == 2 and "no statevault run" in err
    code, _, err = cli("ls", step_dir(run_dir, 10))
    assert code == 2 and "statevault inspect" in err
    code, _, err = cli("ls", tmp_path / "missing")
    assert code == 2


# ---- diff -------------------------------------------------------------------------------------


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


Trained = tuple[str, str, dict[str, torch.Tensor], dict[str, torch.Tensor]]


@pytest.fixture
def trained(tmp_path: Path) -> Trained:
    """Two checkpoints of one run, a few training steps apart, with every kind of change."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    frozen = torch.arange(5, dtype=torch.float32)

    def train(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(4, 6)).pow(2).mean().backward()
            opt.step()

    def state(step: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {"model": model, "optimizer": opt, "frozen": frozen, "step": step, **extra}

    first = {
        "old": torch.ones(2),
        "resized": torch.zeros(3),
        "recast": torch.ones(4),
        "half": torch.ones(6, dtype=torch.bfloat16),
        "note": "warmup",
    }
    second = {
        "new": torch.ones(3),
        "resized": torch.zeros(4),
        "recast": torch.full((4,), 1.5, dtype=torch.float64),
        "half": torch.full((6,), 1.25, dtype=torch.bfloat16),
        "note": "cosine",
    }
    with sv.CheckpointManager(tmp_path / "run", max_to_keep=None) as mgr:
        train(2)
        mgr.save(1, state(1, first))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train(3)
        mgr.save(2, state(2, second))
        after = {k: v.clone() for k, v in model.state_dict().items()}
        return mgr.path(1), mgr.path(2), before, after


def test_diff_reports_changes_with_correct_distances(trained: Trained, cli: Run) -> None:
    a, b, before, after = trained
    doc = cli_json(cli, "diff", a, b, expect=1)
    rows = {row["path"]: row for row in doc["tensors"]}
    assert not doc["identical"]
    for key in before:
        row = rows[f"model/{key}"]
        difference = (before[key].double() - after[key].double()).abs()
        assert row["status"] == "changed"
        assert row["max_abs"] == pytest.approx(difference.max().item(), rel=1e-12)
        expected_rel = (difference.norm() / before[key].double().norm()).item()
        assert row["rel_l2"] == pytest.approx(expected_rel, rel=1e-9)
    assert rows["frozen"]["status"] == "identical" and rows["frozen"]["max_abs"] == 0.0
    assert rows["old"]["status"] == "removed" and rows["new"]["status"] == "added"
    assert rows["resized"]["status"] == "shape_changed"
    assert (rows["resized"]["a"]["shape"], rows["resized"]["b"]["shape"]) == ([3], [4])
    recast = rows["recast"]
    assert recast["status"] == "changed" and recast["dtype_changed"]
    assert (recast["a"]["dtype"], recast["b"]["dtype"]) == ("float32", "float64")
    assert recast["max_abs"] == 0.5 and recast["rel_l2"] == pytest.approx(0.5)
    assert rows["half"]["max_abs"] == 0.25 and rows["half"]["note"] is None  # bfloat16 via torch
    assert rows["optimizer/state/0/exp_avg"]["status"] == "changed"
    values = {row["path"]: row for row in doc["values"]}
    assert values["note"] == {"path": "note", "status": "changed", "a": "warmup", "b": "cosine"}
    assert values["step"]["a"] == 1 and values["step"]["b"] == 2
    assert doc["summary"]["tensors"]["added"] == 1 and doc["summary"]["tensors"]["removed"] == 1


def test_diff_table_and_exit_codes(trained: Trained, tmp_path: Path, cli: Run) -> None:
    a, b, _, _ = trained
    code, out, err = cli("diff", a, b)
    assert (code, err) == (1, "")
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "identical" in lines["frozen"] and "removed" in lines["old"]
    assert "added" in lines["new"] and "shape changed" in lines["resized"]
    assert "changed (dtype)" in lines["recast"] and "0.5" in lines["recast"]
    assert "'warmup'" in lines["note"] and "'cosine'" in lines["note"]
    assert "Differ" in out
    assert cli("diff", a, a)[0] == 0
    code, out, _ = cli("diff", a, b, "--only", "frozen")
    assert code == 0 and "Identical" in out and "model/" not in out
    assert cli_json(cli, "diff", a, b, "--only", "model", expect=1)["values"] == []
    assert cli("diff", a, tmp_path / "nowhere")[0] == 2
    code, _, err = cli("diff", Path(a).parent, b)
    assert code == 2 and "is a run directory" in err
    flip_tensor_byte(b, "model/0.weight")
    code, _, err = cli("diff", a, b)
    assert code == 2 and "damaged" in err  # an error, not a difference


def test_diff_without_torch_says_which_rows_need_it(
    trained: Trained, cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, _, _ = trained
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    rows = {row["path"]: row for row in cli_json(cli, "diff", a, b, expect=1)["tensors"]}
    assert rows["half"]["max_abs"] is None and "needs torch" in rows["half"]["note"]
    assert rows["recast"]["max_abs"] == 0.5  # numpy knows float32 and float64
    code, out, _ = cli("diff", a, b, "--only", "half")
    assert code == 1 and "pip install 'statevault[torch]'" in out


def test_diff_plain_value_types_and_nan(tmp_path: Path, cli: Run) -> None:
    nan = float("nan")
    sv.save({"x": 1, "y": nan, "w": np.array([nan, 1.0, np.inf])}, tmp_path / "a")
    sv.save({"x": 1.0, "y": nan, "w": np.array([nan, 1.0, np.inf])}, tmp_path / "b")
    sv.save({"x": 1, "y": nan, "w": np.array([nan, 2.0, np.inf])}, tmp_path / "c")
    doc = cli_json(cli, "diff", tmp_path / "a", tmp_path / "b", expect=1)
    assert [(v["path"], v["a"], v["b"]) for v in doc["values"]] == [("x", 1, 1.0)]
    assert doc["tensors"][0]["status"] == "identical"
    doc = cli_json(cli, "diff", tmp_path / "a", tmp_path / "c", expect=1)
    (row,) = doc["tensors"]
    assert (row["status"], row["max_abs"]) == ("changed", 1.0)  # NaN and inf positions agree


# ---- rm ---------------------------------------------------------------------------------------


def test_rm_dry_run_deletes_nothing_and_yes_deletes(run_dir: Path, cli: Run) -> None:
    before = snapshot(run_dir)
    target = step_dir(run_dir, 10)
    doc = cli_json(cli, "rm", target)
    assert doc["dry_run"] and snapshot(run_dir) == before
    assert [(i["path"], i["kind"], i["step"], i["deleted"]) for i in doc["items"]] == [
        (str(target), "checkpoint", 10, False)
    ]
    assert doc["bytes"] > 0
    doc = cli_json(cli, "rm", target, "--yes")
    assert not doc["dry_run"] and doc["items"][0]["deleted"] and not target.exists()
    code, out, _ = cli("rm", run_dir, "--step", "20", "--step", "30", "--yes")
    assert code == 0 and "Deleted 2 items" in out
    with sv.CheckpointManager(run_dir, save_on_preemption=False, max_to_keep=None) as mgr:
        assert mgr.all_steps() == [40]


def test_rm_refuses_foreign_directories(tmp_path: Path, run_dir: Path, cli: Run) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    (run_dir / "logs").mkdir()
    (foreign / MANIFEST_NAME).write_text('{"name": "some other tool"}')
    for path in (foreign, run_dir / "logs", run_dir, tmp_path):
        code, _, err = cli("rm", path, "--yes")
        assert code == 2 and "refusing to delete" in err
        assert path.exists()
    code, _, err = cli("rm", step_dir(run_dir, 10), foreign, "--yes")  # all checked first
    assert code == 2 and step_dir(run_dir, 10).exists()
    code, _, err = cli("rm", run_dir, "--step", "11")
    assert code == 2 and "no checkpoint directory for step 11" in err
    standalone = tmp_path / "ckpt"
    sv.save({"w": np.zeros(3)}, standalone)
    assert cli("rm", standalone, "--yes")[0] == 0 and not standalone.exists()


def test_rm_refuses_a_locked_run(run_dir: Path, live: sv.CheckpointManager, cli: Run) -> None:
    before = files_of(run_dir)
    code, _, err = cli("rm", step_dir(run_dir, 10), "--yes")
    assert code == 2 and f"pid {os.getpid()}" in err and "--force" in err
    result = console_script("rm", step_dir(run_dir, 10), "--yes")
    assert result.returncode == 2 and f"pid {os.getpid()}" in result.stderr
    assert files_of(run_dir) == before
    assert cli("rm", step_dir(run_dir, 10), "--yes", "--force")[0] == 0
    assert not step_dir(run_dir, 10).exists()


# ---- gc ---------------------------------------------------------------------------------------


def test_gc_finds_and_removes_exactly_the_garbage(run_dir: Path, cli: Run) -> None:
    committed = {s: snapshot(step_dir(run_dir, s)) for s in LOSSES}
    tmp = make_temporary(run_dir)
    incomplete = make_incomplete(run_dir, 10, 15)
    corrupt = make_corrupt(run_dir, 20, 25)
    aside = run_dir / "step_000000030.corrupt-0a1b2c3d"
    shutil.copytree(step_dir(run_dir, 30), aside)
    before = snapshot(run_dir)

    doc = cli_json(cli, "gc", run_dir)
    assert doc["dry_run"] and doc["run"] == str(run_dir) and snapshot(run_dir) == before
    assert {(i["path"], i["kind"]) for i in doc["items"]} == {
        (str(tmp), "temporary"),
        (str(incomplete), "incomplete"),
    }
    assert any("--corrupt" in note for note in doc["notes"])

    doc = cli_json(cli, "gc", run_dir, "--corrupt")
    kinds = {i["path"]: i["kind"] for i in doc["items"]}
    assert kinds == {
        str(tmp): "temporary",
        str(incomplete): "incomplete",
        str(corrupt): "corrupt",
        str(aside): "corrupt-aside",
    }
    assert doc["bytes"] == sum(i["bytes"] for i in doc["items"]) > 0
    assert snapshot(run_dir) == before

    code, out, _ = cli("gc", run_dir, "--corrupt", "--yes")
    assert code == 0 and "Deleted 4 items" in out
    for path in (tmp, incomplete, corrupt, aside):
        assert not path.exists()
    assert {s: snapshot(step_dir(run_dir, s)) for s in LOSSES} == committed
    assert cli_json(cli, "gc", run_dir, "--corrupt")["items"] == []


def test_gc_retention_keeps_the_newest_and_other_runs(
    run_dir: Path, tmp_path: Path, cli: Run
) -> None:
    with sv.CheckpointManager(tmp_path / "other", max_to_keep=None) as mgr:
        save_steps(mgr, [5])
    shutil.copytree(step_dir(tmp_path / "other", 5), step_dir(run_dir, 5))  # not this run's
    damage_manifest(step_dir(run_dir, 30))
    doc = cli_json(cli, "gc", run_dir, "--keep-last", "1")
    assert [(i["step"], i["kind"]) for i in doc["items"]] == [
        (10, "checkpoint"),
        (20, "checkpoint"),
    ]
    doc = cli_json(cli, "gc", run_dir, "--best-metric", "loss")  # the newest is kept anyway
    assert [i["step"] for i in doc["items"]] == [10]
    doc = cli_json(cli, "gc", run_dir, "--keep-last", "1", "--best-metric", "loss", "--yes")
    assert [i["step"] for i in doc["items"]] == [10]  # 20 has the best loss
    with sv.CheckpointManager(run_dir, max_to_keep=None, save_on_preemption=False) as mgr:
        assert mgr.all_steps() == [5, 20, 40]
    assert step_dir(run_dir, 30).exists()  # corrupt: only with --corrupt
    code, _, err = cli("gc", run_dir, "--keep-best", "2")
    assert code == 2 and "--best-metric" in err


def test_gc_refuses_a_locked_run_unless_forced(
    run_dir: Path, live: sv.CheckpointManager, cli: Run
) -> None:
    incomplete = make_incomplete(run_dir, 10, 15)
    code, _, err = cli("gc", run_dir, "--yes")
    assert code == 2 and f"pid {os.getpid()}" in err and incomplete.exists()
    doc = cli_json(cli, "gc", run_dir, "--yes", "--force")
    assert [i["path"] for i in doc["items"]] == [str(incomplete)] and not incomplete.exists()


def test_gc_and_diff_through_the_console_script(run_dir: Path) -> None:
    make_temporary(run_dir)
    dry = console_script("gc", run_dir, "--json")
    assert dry.returncode == 0, dry.stderr
    assert [i["name"] for i in json.loads(dry.stdout)["items"]] == [TMP_NAME]
    done = console_script("gc", run_dir, "--yes")
    assert done.returncode == 0 and "Deleted 1 item" in done.stdout
    assert not (run_dir / TMP_NAME).exists()
    differ = console_script("diff", step_dir(run_dir, 10), step_dir(run_dir, 20))
    assert differ.returncode == 1 and "Differ" in differ.stdout
    same = console_script("diff", step_dir(run_dir, 10), step_dir(run_dir, 10), "--json")
    assert same.returncode == 0 and json.loads(same.stdout)["identical"]


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_bars_only_when_enabled_on_a_terminal(enabled: bool) -> None:
    for terminal in (True, False):
        stream = io.StringIO()
        console = Console(file=stream, force_terminal=terminal, width=80)
        with runs.progress(console, "Comparing tensors", 10, enabled=enabled) as advance:
            for _ in range(10):
                advance(1)
        assert ("Comparing tensors" in stream.getvalue()) == (enabled and terminal)


def test_run_commands_import_no_framework() -> None:
    code = (
        "import sys\n"
        "from statevault.cli import main, ls_cmd, diff_cmd, rm_cmd, gc_cmd, runs\n"
        "main.build_parser()\n"
        "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env()
    )
    assert result.returncode == 0, result.stderr
