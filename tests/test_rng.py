"""RNGState restores python, numpy and torch streams."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import statevault as sv


def _draw() -> tuple[float, float, float, float]:
    return (random.random(), float(np.random.rand()), float(torch.rand(())), random.gauss(0, 1))


def test_streams_continue_after_restore(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    sv.save({"rng": sv.RNGState()}, tmp_path / "ck")
    expected = [_draw() for _ in range(3)]
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    sv.load(tmp_path / "ck", into={"rng": sv.RNGState()})
    assert [_draw() for _ in range(3)] == expected


def test_state_is_plain_data(tmp_path: Path) -> None:
    sv.save({"rng": sv.RNGState()}, tmp_path / "ck")
    loaded = sv.load(tmp_path / "ck")["rng"]
    assert set(loaded) >= {"python", "numpy", "torch_cpu"}
    assert type(loaded["python"]) is tuple and len(loaded["python"][1]) == 625
    assert type(loaded["numpy"][1]) is np.ndarray and loaded["numpy"][1].dtype == np.uint32
    assert loaded["torch_cpu"].dtype == torch.uint8


def test_a_checkpoint_without_torch_streams_restores_python_and_numpy(tmp_path: Path) -> None:
    """The Keras / numpy recipe: an RNGState saved by a program that never imported torch has
    no torch stream. A program that has imported torch since restores python's and numpy's
    streams from it, strictly, with no warning, and leaves torch's stream alone."""
    path = tmp_path / "ck"
    saver = (
        "import random, sys\n"
        "import numpy as np\n"
        "import statevault as sv\n"
        "random.seed(1); np.random.seed(2)\n"
        f"sv.save({{'rng': sv.RNGState()}}, {str(path)!r})\n"
        "assert 'torch' not in sys.modules\n"
        "print(repr([(random.random(), float(np.random.rand())) for _ in range(3)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", saver], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected = ast.literal_eval(done.stdout.strip())
    assert "torch_cpu" not in sv.load(path)["rng"]

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(7)
    torch_stream = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = sv.load(path, into={"rng": sv.RNGState()})
    assert (state.missing, state.unexpected, state.mismatched) == ([], [], [])
    assert [(random.random(), float(np.random.rand())) for _ in range(3)] == expected
    assert torch.equal(torch.get_rng_state(), torch_stream), "torch's stream is left alone"


def test_restorable_state_asks_only_for_streams_the_checkpoint_has() -> None:
    rng = sv.RNGState()
    saved = {"python": random.getstate(), "numpy": np.random.get_state(legacy=True)}
    assert set(rng.restorable_state(saved)) == {"python", "numpy"}
    assert set(rng.restorable_state({**saved, "torch_cpu": torch.get_rng_state()})) == {
        "python",
        "numpy",
        "torch_cpu",
    }
    assert set(rng.restorable_state({})) == {"python", "numpy"}, "those two are always needed"


def test_a_saved_stream_of_a_framework_not_imported_is_not_demanded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Restored in a program without torch, a checkpoint's torch stream is skipped (with a
    warning, by load_state_dict), not a mismatch: the fit check asks nothing of its shape."""
    saved = {"python": random.getstate(), "numpy": np.random.get_state(legacy=True)}
    with monkeypatch.context() as patched:
        patched.delitem(sys.modules, "torch")  # nothing is imported while it is away
        wanted = sv.RNGState().restorable_state({**saved, "torch_cpu": torch.get_rng_state()})
    assert set(wanted) == {"python", "numpy", "torch_cpu"} and wanted["torch_cpu"] is None
