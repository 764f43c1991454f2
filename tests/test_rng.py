"""RNGState restores python, numpy and torch streams."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
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
