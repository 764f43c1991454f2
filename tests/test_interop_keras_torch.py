"""Issue 5's interop test: weights move Keras -> statevault -> safetensors -> PyTorch and back
(PyTorch -> statevault -> safetensors -> Keras), and the models give the same outputs.

Keras stores a Dense kernel as (in, out); torch's Linear weight is (out, in): the mapping code
of this test transposes, as any user's would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch

keras = pytest.importorskip("keras", reason="Keras (TensorFlow) is not installed (CI installs it)")

import statevault as sv  # noqa: E402
from statevault.cli.main import main  # noqa: E402
from statevault.interop import export_safetensors  # noqa: E402

INPUTS = np.random.default_rng(5).standard_normal((16, 6)).astype(np.float32)


def _keras_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )


def _torch_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _torch_outputs(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(INPUTS)).numpy()


def _keras_outputs(model: keras.Model) -> np.ndarray:
    return np.asarray(model(INPUTS))


def test_keras_to_torch(tmp_path: Path) -> None:
    source = _keras_model(seed=1)
    sv.save({"model": source, "epoch": 2}, tmp_path / "keras_ckpt")
    out = tmp_path / "keras.safetensors"
    assert main(["export", str(tmp_path / "keras_ckpt"), "--to", str(out), "--only", "model"]) == 0
    weights = load_torch(out)
    assert sorted(weights) == ["0.bias", "0.kernel", "1.bias", "1.kernel"]
    target = _torch_model(seed=2)
    assert not np.allclose(_torch_outputs(target), _keras_outputs(source))  # differs before
    target.load_state_dict(
        {
            "0.weight": weights["0.kernel"].T,  # Dense (in, out) -> Linear (out, in)
            "0.bias": weights["0.bias"],
            "2.weight": weights["1.kernel"].T,
            "2.bias": weights["1.bias"],
        }
    )
    assert torch.equal(target[0].weight, torch.from_numpy(np.asarray(source.layers[0].kernel)).T)
    np.testing.assert_allclose(_torch_outputs(target), _keras_outputs(source), rtol=1e-5, atol=1e-6)


def test_torch_to_keras(tmp_path: Path) -> None:
    source = _torch_model(seed=3)
    sv.save({"model": source, "step": 10}, tmp_path / "torch_ckpt")
    out = tmp_path / "torch.safetensors"
    report = export_safetensors(tmp_path / "torch_ckpt", out, only="model")
    assert report.tensors == 4
    weights = load_numpy(out)  # Keras takes numpy arrays
    target = _keras_model(seed=4)
    assert not np.allclose(_keras_outputs(target), _torch_outputs(source))
    target.layers[0].kernel.assign(weights["0.weight"].T)  # Linear (out, in) -> Dense (in, out)
    target.layers[0].bias.assign(weights["0.bias"])
    target.layers[1].kernel.assign(weights["2.weight"].T)
    target.layers[1].bias.assign(weights["2.bias"])
    np.testing.assert_array_equal(
        np.asarray(target.layers[1].bias), source[2].bias.detach().numpy()
    )
    np.testing.assert_allclose(_keras_outputs(target), _torch_outputs(source), rtol=1e-5, atol=1e-6)


def test_round_trip_through_import_is_exact(tmp_path: Path) -> None:
    """Keras -> export -> import -> statevault checkpoint -> torch: the bytes survive exactly."""
    source = _keras_model(seed=6)
    sv.save({"model": source}, tmp_path / "a")
    export_safetensors(tmp_path / "a", tmp_path / "w.safetensors", only="model")
    assert main(["import", str(tmp_path / "w.safetensors"), "--to", str(tmp_path / "b")]) == 0
    imported = sv.load(tmp_path / "b")
    for index, layer in enumerate(source.layers):
        np.testing.assert_array_equal(imported[f"{index}.kernel"], np.asarray(layer.kernel))
        np.testing.assert_array_equal(imported[f"{index}.bias"], np.asarray(layer.bias))
    target = _keras_model(seed=7)
    target.layers[0].kernel.assign(imported["0.kernel"])
    target.layers[0].bias.assign(imported["0.bias"])
    target.layers[1].kernel.assign(imported["1.kernel"])
    target.layers[1].bias.assign(imported["1.bias"])
    np.testing.assert_array_equal(_keras_outputs(target), _keras_outputs(source))
