"""Exact resume: a run resumed in a new process from a checkpoint is the run it would have been.

The workload (tests/workloads.py ``train`` / ``resume``) is a small MLP with dropout, AdamW,
OneCycleLR and a GradScaler, with data drawn from torch, numpy and python ``random``. The
uninterrupted run saves {model, optimizer, scheduler, scaler, rng: sv.RNGState(), step} after
step k and goes on to step N; a second process builds fresh objects, loads that checkpoint into
them and runs k+1..N. Losses, parameters, optimizer, scheduler and scaler state must be
bit-identical. The negative control resumes without the RNG state and must diverge, which
proves the comparison is sensitive to the random streams.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import statevault as sv

WORKLOADS = Path(__file__).with_name("workloads.py")
STEPS, SAVE_AT = 24, 10


def run_workload(cwd: Path, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(WORKLOADS), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"workload {args} failed:\n{proc.stdout}\n{proc.stderr}"


def read_results(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    summary = json.loads(out.with_suffix(".json").read_text())
    summary["losses"] = {int(k): float.fromhex(v) for k, v in summary["losses"].items()}
    return summary, safetensors.torch.load_file(str(out.with_suffix(".safetensors")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The uninterrupted run (its own process): the checkpoint after step k and its results."""
    work = tmp_path_factory.mktemp("resume")
    run_workload(
        work,
        "train",
        f"--steps={STEPS}",
        f"--save-at={SAVE_AT}",
        f"--ckpt={work / 'ckpt'}",
        f"--out={work / 'reference'}",
    )
    return work / "ckpt", work / "reference"


def resume(reference: tuple[Path, Path], tmp_path: Path, *extra: str) -> Path:
    ckpt, _ = reference
    out = tmp_path / "resumed"
    run_workload(tmp_path, "resume", f"--steps={STEPS}", f"--ckpt={ckpt}", f"--out={out}", *extra)
    return out


def test_checkpoint_holds_the_whole_training_state(reference: tuple[Path, Path]) -> None:
    ckpt, _ = reference
    assert sv.verify(ckpt).ok
    state = sv.load(ckpt)
    assert set(state) == {"model", "optimizer", "scheduler", "scaler", "rng", "step"}
    assert state["step"] == SAVE_AT
    assert set(state["rng"]) == {"python", "numpy", "torch_cpu"}
    assert type(state["rng"]["python"]) is tuple
    assert type(state["rng"]["numpy"]) is tuple
    assert state["rng"]["torch_cpu"].dtype == torch.uint8
    scaler = state["scaler"]
    assert scaler["scale"] != 2.0**10, "the scaler should have grown by the save"
    assert scaler["growth_interval"] == 3
    assert set(state["optimizer"]["state"]) == {0, 1, 2, 3}  # int keys stay int
    assert state["scheduler"]["last_epoch"] == SAVE_AT


def test_resume_in_new_process_is_bit_identical(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    expected, expected_tensors = read_results(reference[1])
    actual, actual_tensors = read_results(resume(reference, tmp_path))
    assert sorted(expected["losses"]) == list(range(1, STEPS + 1))
    assert sorted(actual["losses"]) == list(range(SAVE_AT + 1, STEPS + 1))
    for step, loss in actual["losses"].items():
        assert loss == expected["losses"][step], f"loss of step {step} differs"
    assert actual_tensors.keys() == expected_tensors.keys()
    assert any(name.startswith("optimizer/") for name in expected_tensors)
    for name, tensor in expected_tensors.items():
        assert torch.equal(actual_tensors[name], tensor), f"{name} differs"
        assert actual_tensors[name].dtype == tensor.dtype
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["scheduler"] == expected["scheduler"]
    assert actual["scaler"] == expected["scaler"]


def test_resume_without_rng_state_diverges(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """Negative control: without sv.RNGState the data and dropout masks are different."""
    expected, expected_tensors = read_results(reference[1])
    actual, actual_tensors = read_results(resume(reference, tmp_path, "--no-rng"))
    resumed_steps = range(SAVE_AT + 1, STEPS + 1)
    differing = [s for s in resumed_steps if actual["losses"][s] != expected["losses"][s]]
    assert len(differing) == len(resumed_steps), f"only steps {differing} differ"
    assert not torch.equal(actual_tensors["model/fc1.weight"], expected_tensors["model/fc1.weight"])
    # Everything that is not random still matches: the scheduler is in the same place.
    assert actual["scheduler"] == expected["scheduler"]
