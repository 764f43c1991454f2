"""A TensorFlow run stopped and resumed in a new process matches an uninterrupted run bit for
bit on CPU: a custom training loop (sv.save / sv.load) and model.fit with the Keras callback
(preempted by SIGTERM mid-epoch, mixed_float16 with its loss-scale optimizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="TensorFlow is not installed (CI installs it)")

HELPER = Path(__file__).with_name("tf_helpers.py")
ROOT = HELPER.parent.parent


def start(*args: str | Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(
        [sys.executable, str(HELPER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-3000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def assert_identical(a: Path, b: Path) -> None:
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x) == sorted(y)
        different = [k for k in x if not np.array_equal(x[k], y[k], equal_nan=True)]
    assert different == []


@pytest.mark.timeout(600)
def test_custom_loop_resumes_exactly_in_a_new_process(tmp_path: Path) -> None:
    full = start("loop-full", tmp_path / "full.npz")
    part1 = start("loop-part1", tmp_path / "ckpt")
    finish(full), finish(part1)
    result = finish(start("loop-part2", tmp_path / "ckpt", tmp_path / "resumed.npz"))
    assert result["iterations"] == 12
    assert_identical(tmp_path / "full.npz", tmp_path / "resumed.npz")


@pytest.mark.timeout(600)
def test_fit_preempted_mid_epoch_resumes_exactly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    full = start("fit-full", tmp_path / "full.npz")
    preempted = finish(start("fit-preempt", run))
    finish(full)
    # SIGTERM after global batch 10; agreed and saved at the end of batch 11 (epoch 1, batch 5)
    assert preempted["preempted"] and preempted["step"] == 11
    assert (preempted["epoch"], preempted["batch"]) == (1, 5)
    assert preempted["optimizer"] == "LossScaleOptimizer"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == [
        "step_000000004",
        "step_000000008",
        "step_000000011",
    ]

    resumed = finish(start("fit-resume", run, tmp_path / "resumed.npz"))
    assert resumed["resumed_at"] == [1, 5, 11]
    assert resumed["restored_best"] == preempted["best"]  # the callback's own state came back
    assert (resumed["epoch"], resumed["batch"], resumed["step"]) == (3, 0, 18)
    assert_identical(tmp_path / "full.npz", tmp_path / "resumed.npz")
