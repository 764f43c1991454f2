"""Deployment hand-off (statevault.interop.deploy, ``statevault deploy``): a checkpoint's model,
built by the user's function, filled with the checkpoint's weights through the verified load,
exported as a torch.export program, a Hugging Face ``save_pretrained`` directory or a Keras
model's TF SavedModel; and what is refused (a damaged checkpoint, a bad builder, an output that
is not an earlier export)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import statevault as sv
from statevault.interop.deploy import deploy
from tests.test_lightning import ROOT

BUILDERS = """
import torch


def torch_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return model, (torch.ones(3, 4),)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=96, n_positions=32)
    return GPT2LMHeadModel(config)


def broken():
    raise RuntimeError("no such model")
"""


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "statevault.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _torch_model() -> torch.nn.Sequential:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_torch_export_from_a_lightning_style_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "builders.py").write_text(BUILDERS)
    model = _torch_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    sv.save({"state_dict": model.state_dict(), "optimizer_states": [optimizer]}, tmp_path / "c")
    result = _cli(
        "deploy", "c", "--build", "builders.py:torch_model", "--to", "m.pt2", "--json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "torch-export" and report["only"] == "state_dict"
    program = torch.export.load(str(tmp_path / "m.pt2"))
    x = torch.randn(3, 4)
    assert torch.equal(program.module()(x), model(x))
    broken = _cli("deploy", "c", "--build", "builders.py:broken", "--to", "x.pt2", cwd=tmp_path)
    assert broken.returncode == 2 and "no such model" in broken.stderr
    assert not (tmp_path / "x.pt2").exists()


def test_an_output_is_replaced_only_when_asked_and_only_an_export(tmp_path: Path) -> None:
    sv.save({"model": _torch_model()}, tmp_path / "c")

    def build() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
        return _torch_model(), (torch.ones(1, 4),)

    deploy(tmp_path / "c", build, tmp_path / "m.pt2")
    with pytest.raises(sv.CheckpointExistsError, match="overwrite"):
        deploy(tmp_path / "c", build, tmp_path / "m.pt2")
    assert deploy(tmp_path / "c", build, tmp_path / "m.pt2", overwrite=True).only == "model"
    (tmp_path / "notes").mkdir()
    with pytest.raises(sv.CheckpointError, match="not replacing"):
        deploy(tmp_path / "c", build, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "m.pt2", "notes"]


def test_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    sv.save({"model": _torch_model()}, tmp_path / "c")
    shard = next((tmp_path / "c").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(sv.CorruptCheckpointError):
        deploy(tmp_path / "c", lambda: (_torch_model(), (torch.ones(1, 4),)), tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()


def test_hugging_face_save_pretrained_without_the_optimizer(tmp_path: Path) -> None:
    (tmp_path / "builders.py").write_text(BUILDERS)
    script = (  # one process: transformers is imported once
        "import sys, torch, statevault as sv, builders\n"
        "from statevault.cli.main import main\n"
        "torch.manual_seed(3)\n"
        "model = builders.gpt2()\n"
        "opt = torch.optim.AdamW(model.parameters())\n"
        "sv.save({'model': model, 'optimizer': opt, 'trainer_state': '{}'}, 'ckpt')\n"
        "sys.exit(main(['deploy', 'ckpt', '--build', 'builders:gpt2', '--to', 'hf']))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT / 'src'}:{tmp_path}"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "DEPLOYED" in result.stdout and "hf of transformers" in result.stdout
    from safetensors.numpy import load_file

    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    saved = sv.load(tmp_path / "ckpt", only="model")
    assert set(exported) <= set(saved) and "transformer.wte.weight" in exported
    for name, array in exported.items():
        assert np.array_equal(array, saved[name].numpy()), name
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_layer"] == 2
    assert not [p for p in (tmp_path / "hf").iterdir() if "optim" in p.name]


def test_keras_saved_model(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")

    def build() -> object:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        return model

    trained = build()
    trained.fit(np.ones((8, 4), "float32"), np.ones((8, 1), "float32"), epochs=1, verbose=0)
    sv.save({"model": trained, "optimizer": trained.optimizer}, tmp_path / "c")
    report = deploy(tmp_path / "c", build, tmp_path / "served")
    assert report.format == "savedmodel" and report.only == "model"
    served = tf.saved_model.load(str(tmp_path / "served"))
    x = np.random.rand(5, 4).astype("float32")
    assert np.array_equal(served.serve(x).numpy(), trained(x).numpy())
