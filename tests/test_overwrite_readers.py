"""Readers never see a torn view: a load or verify running while another process overwrites the
checkpoint (``sv.save(..., overwrite=True)``) reads entirely the old or entirely the new one.

On a local disk a reader opens the checkpoint's directory once and reads every file through that
descriptor (checkpoint.py), so the atomic swap of an overwrite cannot mix the old manifest with
the new shards; when the old one is deleted under the reader, the reader starts again on the one
now at the path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import statevault as sv
from tests.manager_helpers import child_env

WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import statevault as sv

    path, seconds = sys.argv[1], float(sys.argv[2])
    deadline = time.monotonic() + seconds
    i = 1
    while time.monotonic() < deadline:
        state = {"a": np.full(4096, i, np.int64), "b": np.full(50_000, i, np.int32), "i": i}
        sv.save(state, path, overwrite=True)
        i += 1
    print(i, flush=True)
    """
)


def test_loads_and_verifies_during_overwrites_see_one_whole_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    sv.save({"a": np.zeros(4096, np.int64), "b": np.zeros(50_000, np.int32), "i": 0}, path)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "8"],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    loads = verifies = 0
    seen: set[int] = set()
    errors: list[str] = []
    try:
        time.sleep(1.0)  # the writer is importing; then it overwrites in a loop
        while writer.poll() is None:
            try:
                state = sv.load(path)
                i = state["i"]
                # every array comes from the save that wrote the manifest read
                assert np.all(state["a"] == i) and np.all(state["b"] == i), f"torn at {i}"
                seen.add(i)
                loads += 1
                report = sv.verify(path)
                if not report.ok:
                    errors.append(f"verify: {report.problems}")
                verifies += 1
            except (sv.CheckpointError, AssertionError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        saves = int(writer.communicate(timeout=60)[0])
    assert writer.returncode == 0
    assert saves > 50 and len(seen) > 20, f"the reads must overlap the writes: {saves}, {seen}"
    assert not errors, f"{len(errors)} of {loads + verifies} reads failed: {errors[:5]}"


def test_a_manifest_deleted_between_its_stat_and_its_open_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The narrowest window of the race above, made certain: the overwrite swaps the directory
    and deletes the old manifest after the reader found it but before it opened it. The reader
    must read the new checkpoint, not report corruption."""
    from statevault.storage import local

    path = tmp_path / "ckpt"
    sv.save({"i": 1}, path)
    real_open_read = local.open_read
    overwrites: list[int] = []

    def overwrite_first(name: str, dir_fd: int | None = None) -> int:
        if not overwrites:
            overwrites.append(2)
            sv.save({"i": 2}, path, overwrite=True)  # swaps, then deletes the old manifest
        return real_open_read(name, dir_fd=dir_fd)

    monkeypatch.setattr(local, "open_read", overwrite_first)  # read_plain_file's open
    assert sv.load(path)["i"] == 2
    assert overwrites == [2]
