"""Incremental checkpoints (checkpoint/reuse.py): a save of a run writes only the files whose
tensors changed and shares the others with the newest checkpoint (hard links on a local disk,
server-side copies on a store), and every checkpoint stays whole.

Sizes are read from the filesystem (files whose inode is new, the inodes of a run counted
once), never from statevault's own counters."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import statevault as sv
from statevault.checkpoint.open import open_checkpoint
from statevault.cli.main import main
from statevault.cli.render import human_bytes
from statevault.format.checksum import crc32c_of, format_checksum
from statevault.manager.naming import step_dir_name

BASE_IN, BASE_OUT, RANK = 512, 1024, 16  # a frozen 2 MiB base, LoRA adapters of rank 16


class LoraRun:
    """A frozen base with LoRA adapters, trained by AdamW: what changes at every step is the
    adapters and their moments, never the base."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.base = torch.nn.Linear(BASE_IN, BASE_OUT)
        self.base.requires_grad_(False)
        self.a = torch.nn.Parameter(torch.randn(BASE_IN, RANK) * 0.01)
        self.b = torch.nn.Parameter(torch.zeros(RANK, BASE_OUT))
        self.optimizer = torch.optim.AdamW([self.a, self.b], lr=1e-2)

    def step(self) -> None:
        x = torch.randn(4, BASE_IN)
        (self.base(x) + x @ self.a @ self.b).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def state(self) -> dict[str, Any]:
        return {"base": self.base, "lora": {"a": self.a, "b": self.b}, "opt": self.optimizer}

    def changed_bytes(self) -> int:
        """The payload that changes at every step: adapters and their two moments (and the
        optimizer's step counters)."""
        adapters = sum(p.numel() * p.element_size() for p in (self.a, self.b))
        counters = sum(
            s["step"].numel() * s["step"].element_size() for s in self.optimizer.state.values()
        )
        return 3 * adapters + counters

    def base_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.base.parameters())


def inodes(directory: Path) -> dict[tuple[int, int], int]:
    """Every file under ``directory`` by inode, with its size (hard links counted once)."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            info = os.lstat(os.path.join(root, name))
            found[(info.st_dev, info.st_ino)] = info.st_size
    return found


def new_bytes(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int]) -> int:
    return sum(size for inode, size in after.items() if inode not in before)


def payload_files(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.glob("data-*.safetensors"))


def test_a_lora_run_writes_about_what_changed_and_keeps_three_for_one_base(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    lora = LoraRun()
    written = []
    with sv.CheckpointManager(run_dir, max_to_keep=3) as mgr:
        for step in range(6):
            lora.step()
            before = inodes(run_dir)
            mgr.save(step, lora.state())
            written.append(new_bytes(before, inodes(run_dir)))
    changed = lora.changed_bytes()
    assert written[0] > lora.base_bytes(), "the first save writes everything"
    for step, amount in enumerate(written[1:], start=1):
        # the changed payload plus its shard header, the manifest and the marker
        assert amount <= 1.1 * changed + 16 * 1024, (step, amount, changed)
    on_disk = sum(inodes(run_dir).values())
    assert on_disk <= lora.base_bytes() + 3 * changed * 1.15 + 64 * 1024, (on_disk, changed)
    restored = LoraRun(seed=1)
    sv.load(run_dir / step_dir_name(5), into=restored.state())
    assert torch.equal(restored.base.weight, lora.base.weight)
    assert torch.equal(restored.a, lora.a) and torch.equal(restored.b, lora.b)


def test_a_frozen_tensor_changed_through_data_is_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lora = LoraRun()
    original = lora.base.weight.detach().clone()
    with sv.CheckpointManager(run_dir, max_to_keep=None) as mgr:
        mgr.save(1, lora.state())
        mgr.save(2, lora.state())  # nothing changed: every file shared, nothing written
        info = mgr.metadata(2)["save"]
        assert info["bytes_written"] == 0 and info["bytes_shared"] > lora.base_bytes()
        lora.base.weight.data[0, 0] += 1.0  # no optimizer, no version counter: only the bytes
        before = inodes(run_dir)
        mgr.save(3, lora.state())
        assert new_bytes(before, inodes(run_dir)) >= lora.base.weight.numel() * 4
    loaded = sv.load(run_dir / step_dir_name(3))
    assert torch.equal(loaded["base"]["weight"], lora.base.weight)
    earlier = sv.load(run_dir / step_dir_name(2))
    assert torch.equal(earlier["base"]["weight"], original), "the shared copy is untouched"


def test_weights_loaded_into_a_frozen_base_are_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lora = LoraRun()
    with sv.CheckpointManager(run_dir, max_to_keep=None) as mgr:
        mgr.save(1, lora.state())
        lora.base.load_state_dict(LoraRun(seed=7).base.state_dict())
        mgr.save(2, lora.state())
    assert torch.equal(sv.load(run_dir / step_dir_name(2))["base"]["weight"], lora.base.weight)

    def base_inodes(step: int) -> set[int]:
        files = payload_files(run_dir / step_dir_name(step))
        return {f.stat().st_ino for f in files if f.stat().st_size > lora.base_bytes()}

    assert base_inodes(1) and base_inodes(2) and not base_inodes(1) & base_inodes(2)


def test_every_checkpoint_stays_whole_copied_alone_or_with_the_others_deleted(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    lora = LoraRun()
    with sv.CheckpointManager(run_dir, max_to_keep=None) as mgr:
        for step in range(4):
            lora.step()
            mgr.save(step, lora.state())
    expected = {k: v.clone() for k, v in lora.base.state_dict().items()}
    copy = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(run_dir / step_dir_name(2), copy)  # cp -r
    assert sv.verify(copy).ok
    for step in (0, 1, 3):
        shutil.rmtree(run_dir / step_dir_name(step))
    assert sv.verify(run_dir / step_dir_name(2)).ok
    for loaded in (sv.load(copy), sv.load(run_dir / step_dir_name(2))):
        assert torch.equal(loaded["base"]["weight"], expected["weight"])


def test_retention_never_deletes_bytes_another_checkpoint_needs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lora = LoraRun()
    with sv.CheckpointManager(run_dir, max_to_keep=2, keep_every_n_steps=4) as mgr:
        for step in range(9):
            lora.step()
            mgr.save(step, lora.state())
        kept = mgr.all_steps()
    assert kept == [0, 4, 7, 8]
    for step in kept:
        report = sv.verify(run_dir / step_dir_name(step))
        assert report.ok, (step, report.problems)
    bases = {
        os.lstat(f).st_ino
        for step in kept
        for f in payload_files(run_dir / step_dir_name(step))
        if os.lstat(f).st_size > lora.base_bytes()
    }
    assert len(bases) == 1, "one base shared by every kept checkpoint"


def test_a_restarted_run_shares_at_its_first_save(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lora = LoraRun()
    with sv.CheckpointManager(run_dir) as mgr:
        for step in range(3):
            lora.step()
            mgr.save(step, lora.state())
    lora.step()
    with sv.CheckpointManager(run_dir) as mgr:  # a new process would see the same run
        before = inodes(run_dir)
        mgr.save(3, lora.state())
        assert new_bytes(before, inodes(run_dir)) <= 1.1 * lora.changed_bytes() + 16 * 1024


def test_ls_shows_per_checkpoint_the_bytes_written_and_shared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    lora = LoraRun()
    written = {}
    with sv.CheckpointManager(run_dir) as mgr:
        for step in range(3):
            lora.step()
            before = inodes(run_dir)
            mgr.save(step, lora.state())
            written[step] = new_bytes(before, inodes(run_dir))
    capsys.readouterr()
    assert main(["ls", str(run_dir), "--json"]) == 0
    rows = {row["step"]: row["save"] for row in json.loads(capsys.readouterr().out)["checkpoints"]}
    for step, save in rows.items():
        # Shard files only: the filesystem's new bytes also hold the manifest and the marker.
        assert 0 < written[step] - save["bytes_written"] < 16 * 1024, (step, save, written)
    assert rows[0]["bytes_shared"] == 0
    assert rows[2]["bytes_shared"] >= lora.base_bytes()
    assert main(["ls", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert "Written / shared" in table
    line = next(line for line in table.splitlines() if line.strip().startswith("2 "))
    shared_text = human_bytes(rows[2]["bytes_shared"])
    assert f"{human_bytes(rows[2]['bytes_written'])} / {shared_text}" in line, line


def test_incremental_false_writes_everything_and_records_no_hashes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lora = LoraRun()
    with sv.CheckpointManager(run_dir, incremental=False) as mgr:
        mgr.save(1, lora.state())
        before = inodes(run_dir)
        mgr.save(2, lora.state())
        assert new_bytes(before, inodes(run_dir)) > lora.base_bytes()
    with open_checkpoint(run_dir / step_dir_name(2)) as checkpoint:
        assert all(row.hash is None for row in checkpoint.manifest.tensors)
        assert "bytes_shared" not in checkpoint.manifest.info["save"]


def test_a_reader_that_ignores_content_hashes_reads_the_same_checkpoint(tmp_path: Path) -> None:
    """Format versions 1 and 2 readers skip row fields they do not know: a manifest stripped of
    its content hashes (what such a reader sees) loads to the same values."""
    run_dir = tmp_path / "run"
    lora = LoraRun()
    with sv.CheckpointManager(run_dir) as mgr:
        mgr.save(1, lora.state())
        mgr.save(2, lora.state())
    ckpt = run_dir / step_dir_name(2)
    stripped = tmp_path / "stripped"
    shutil.copytree(ckpt, stripped)
    document = json.loads((stripped / "manifest.json").read_bytes())
    body = document["body"]
    hashed = [row for row in body["tensors"] if "hash" in row]
    assert {row["path"] for row in hashed} == {"base/weight", "base/bias"}, "the stable files"
    for row in hashed:
        del row["hash"]
    (stripped / "manifest.json").write_bytes(_envelope(document["format_version"], body))
    with open_checkpoint(ckpt) as full, open_checkpoint(stripped) as plain:
        assert full.manifest.format_version == plain.manifest.format_version
    a, b = sv.load(ckpt), sv.load(stripped)
    assert torch.equal(a["base"]["weight"], b["base"]["weight"])
    assert torch.equal(a["lora"]["a"], b["lora"]["a"])


def _envelope(version: int, body: dict[str, Any]) -> bytes:
    data = json.dumps(body, ensure_ascii=True, allow_nan=False, indent=1).encode()
    checksum = format_checksum(crc32c_of(data))
    head = f'{{"format":"statevault","format_version":{version},"checksum":"{checksum}","body":'
    return head.encode() + data + b"}\n"


def test_a_run_on_an_object_store_copies_server_side_and_stays_whole(memory_root: str) -> None:
    run = f"{memory_root}/run"
    lora = LoraRun()
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        for step in range(3):
            lora.step()
            mgr.save(step, lora.state())
        info = mgr.metadata(2)["save"]
    assert info["bytes_shared"] >= lora.base_bytes()
    assert info["bytes_written"] <= 1.1 * lora.changed_bytes() + 16 * 1024
    import fsspec

    fs = fsspec.filesystem("memory")
    for step in (0, 1):
        fs.rm(f"{run}/{step_dir_name(step)}", recursive=True)
    assert sv.verify(f"{run}/{step_dir_name(2)}").ok
    assert torch.equal(sv.load(f"{run}/{step_dir_name(2)}")["base"]["weight"], lora.base.weight)


def test_every_file_a_manifest_lists_lies_in_its_own_directory(tmp_path: Path) -> None:
    """No delta chains: a restore reads one directory, however many saves came before."""
    run_dir = tmp_path / "run"
    lora = LoraRun()
    with sv.CheckpointManager(run_dir, max_to_keep=None) as mgr:
        for step in range(5):
            lora.step()
            mgr.save(step, lora.state())
    for step in range(5):
        ckpt = run_dir / step_dir_name(step)
        with open_checkpoint(ckpt) as checkpoint:
            names = {f.name for f in checkpoint.manifest.files}
        assert names == {p.name for p in payload_files(ckpt)}


@pytest.fixture
def numpy_state() -> Iterator[dict[str, Any]]:
    yield {"frozen": np.arange(1 << 18, dtype=np.float32), "moving": np.zeros(1024)}


def test_without_a_hint_the_layout_learns_which_tensors_do_not_change(
    tmp_path: Path, numpy_state: dict[str, Any]
) -> None:
    """numpy arrays carry no requires_grad: the second save finds the frozen array unchanged
    (it shares a file with a changing one, so it is written again), the third writes it apart
    from the changing one, and from the fourth on it is shared."""
    run_dir = tmp_path / "run"
    written = []
    with sv.CheckpointManager(run_dir, max_to_keep=None) as mgr:
        for step in range(6):
            numpy_state["moving"] += 1
            before = inodes(run_dir)
            mgr.save(step, numpy_state)
            written.append(new_bytes(before, inodes(run_dir)))
    frozen = numpy_state["frozen"].nbytes
    assert all(amount > frozen for amount in written[:3]), written
    assert all(amount < frozen // 8 for amount in written[3:]), written


KILL_CHILD = """
import os, sys, time
import numpy as np
import statevault as sv

run = sys.argv[1]
state = {"frozen": np.arange(1 << 20, dtype=np.float32), "moving": np.zeros(4096)}
with sv.CheckpointManager(run, max_to_keep=2, async_save=True) as mgr:
    restored = mgr.restore(into=None)
    step = restored.step + 1 if restored else 0
    if restored is None:  # the run has a checkpoint before the first kill can come
        mgr.save(step, state)
        mgr.wait()
        step += 1
    os.write(1, b"READY\\n")
    while True:
        state["moving"][:] = step
        mgr.save(step, state)
        step += 1
"""


def _listed_checkpoints_verify(run_dir: Path) -> list[str]:
    from statevault.manager.index import scan_run

    problems = []
    for record in scan_run(str(run_dir)).committed():
        report = sv.verify(record.path)
        if not report.ok:
            problems.append(f"{record.path}: {report.problems[:2]}")
    return problems


def test_sigkill_during_saves_and_retention_leaves_every_listed_checkpoint_whole(
    tmp_path: Path,
) -> None:
    import random
    import signal
    import subprocess
    import sys
    import time

    from tests.manager_helpers import child_env

    run_dir = tmp_path / "run"
    rng = random.Random(14)
    problems: list[str] = []
    for kill in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", KILL_CHILD, str(run_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"READY\n", child.stderr.read() if child.stderr else ""
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        problems += [f"kill {kill}: {p}" for p in _listed_checkpoints_verify(run_dir)]
        with sv.CheckpointManager(run_dir, max_to_keep=2) as mgr:  # sweeps what the kill left
            steps = mgr.all_steps()
        problems += [f"after kill {kill}: {p}" for p in _listed_checkpoints_verify(run_dir)]
        assert steps, "a checkpoint survives every kill"
    assert not problems, "\n".join(problems)
    with open_checkpoint(run_dir / step_dir_name(steps[-1])) as checkpoint:
        assert checkpoint.manifest.info["save"]["bytes_shared"] > 0, "the run kept sharing"


GC_CHILD = """
import os, sys, time
from statevault.cli.main import main

unlink = os.unlink


def slow_unlink(path, *args, **kwargs):  # deletions slowed down, so that the kill lands in one
    os.write(1, b"UNLINK\\n")
    time.sleep(0.01)
    return unlink(path, *args, **kwargs)


os.unlink = slow_unlink
sys.exit(main(["gc", sys.argv[1], "--keep-last", "1", "--yes"]))
"""


def test_sigkill_during_gc_leaves_every_listed_checkpoint_whole(tmp_path: Path) -> None:
    import random
    import signal
    import subprocess
    import sys
    import time

    from tests.manager_helpers import child_env

    rng = random.Random(15)
    for attempt in range(4):
        run_dir = tmp_path / f"run{attempt}"
        state = {"frozen": np.arange(1 << 20, dtype=np.float32), "moving": np.zeros(64)}
        with sv.CheckpointManager(run_dir, max_to_keep=None) as mgr:
            for step in range(12):
                state["moving"][:] = step
                mgr.save(step, state)
        gc = subprocess.Popen(
            [sys.executable, "-c", GC_CHILD, str(run_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=child_env(),
        )
        assert gc.stdout is not None
        for _ in range(rng.randint(2, 30)):  # into the deletions: some done, one under way
            assert gc.stdout.readline() == b"UNLINK\n"
        time.sleep(rng.uniform(0.0, 0.01))
        gc.send_signal(signal.SIGKILL)
        gc.wait(timeout=30)
        steps_left = sorted(p.name for p in run_dir.glob("step_*") if ".tmp-" not in p.name)
        assert 1 < len(steps_left) < 12, "the kill landed while gc was deleting"
        assert not _listed_checkpoints_verify(run_dir)
        with sv.CheckpointManager(run_dir, max_to_keep=None) as mgr:
            steps = mgr.all_steps()
        assert 11 in steps and not _listed_checkpoints_verify(run_dir)
        assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name], "swept"
        assert np.array_equal(sv.load(run_dir / step_dir_name(11))["frozen"], state["frozen"])


def _crc32c_collision(data: bytes) -> bytes:
    """``data`` with 8 bytes changed so that its CRC32C stays the same.

    CRC32C is affine over GF(2): crc(a ^ d) = crc(a) ^ crc(d) ^ crc(0...0). So any ``d`` in the
    kernel of d -> crc(d) ^ crc(0...0), found by elimination over 64 bits of ``d`` (two 4-byte
    words) mapped into 32, keeps the CRC."""
    zero = crc32c_of(bytes(len(data)))
    columns = []
    for bit in range(64):
        delta = bytearray(len(data))
        position = (bit // 32) * (len(data) // 2) + (bit % 32) // 8
        delta[position] = 1 << (bit % 8)
        columns.append((crc32c_of(bytes(delta)) ^ zero, 1 << bit))
    pivots: dict[int, tuple[int, int]] = {}
    for value, combination in columns:
        while value:
            top = value.bit_length() - 1
            if top not in pivots:
                pivots[top] = (value, combination)
                break
            pivot_value, pivot_combination = pivots[top]
            value, combination = value ^ pivot_value, combination ^ pivot_combination
        if value == 0:  # a kernel element: these bits of d leave the CRC unchanged
            out = bytearray(data)
            for bit in range(64):
                if combination >> bit & 1:
                    out[(bit // 32) * (len(data) // 2) + (bit % 32) // 8] ^= 1 << (bit % 8)
            return bytes(out)
    raise AssertionError("64 vectors in 32 dimensions always have a kernel")


def test_equal_crc32c_is_not_enough_to_share_a_file(tmp_path: Path) -> None:
    """A volatile file (no content hashes) is shared only when its bytes equal the baseline's:
    a change that keeps every CRC32C is written, and loads back as it was saved."""
    run_dir = tmp_path / "run"
    state = {"w": np.arange(1024, dtype=np.float32)}
    with sv.CheckpointManager(run_dir, max_to_keep=None) as mgr:
        mgr.save(0, state)
        state["w"] = state["w"] + 1  # changed: volatile from now on
        mgr.save(1, state)
        forged = _crc32c_collision(state["w"].tobytes())
        assert forged != state["w"].tobytes()
        assert crc32c_of(forged) == crc32c_of(state["w"].tobytes())
        state["w"] = np.frombuffer(forged, dtype=np.float32).copy()
        mgr.save(2, state)
        assert mgr.metadata(2)["save"]["bytes_shared"] == 0
        mgr.save(3, state)  # truly unchanged: shared after comparing the bytes
        assert mgr.metadata(3)["save"]["bytes_written"] == 0
    assert sv.load(run_dir / step_dir_name(2))["w"].tobytes() == forged
    assert sv.load(run_dir / step_dir_name(3))["w"].tobytes() == forged
    with open_checkpoint(run_dir / step_dir_name(3)) as checkpoint:
        rows = checkpoint.manifest.tensors
        assert all(row.hash is None for row in rows), "its rows are the baseline's"
