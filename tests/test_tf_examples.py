"""examples/tf_seed.py: TensorFlow's checkpoint guide rewritten with statevault runs, keeps the
three newest checkpoints and, run again, continues from the latest one exactly."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="TensorFlow is not installed (CI installs it)")

import statevault as sv

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tf_seed.py"


def test_seed_example_keeps_three_and_restores_the_latest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = runpy.run_path(str(EXAMPLE))["main"]
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    assert main(["--dir", str(interrupted), "--steps", "25"]) == [10, 20]
    assert main(["--dir", str(interrupted), "--steps", "45"]) == [20, 30, 40]
    assert "restored from step 20" in capsys.readouterr().out
    assert main(["--dir", str(straight), "--steps", "45"]) == [20, 30, 40]

    resumed = sv.load(interrupted / "step_000000040")
    uninterrupted = sv.load(straight / "step_000000040")
    for part in ("model", "optimizer"):
        assert list(resumed[part]) == list(uninterrupted[part])
        for key in resumed[part]:
            a, b = resumed[part][key].numpy(), uninterrupted[part][key].numpy()
            assert np.array_equal(a, b), f"{part}/{key}"
