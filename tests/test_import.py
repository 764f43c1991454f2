"""``statevault import`` and ``statevault.interop.import_checkpoint``: TensorFlow checkpoints,
safetensors files, ``torch.save`` files and DCP directories become statevault checkpoints with
the same values; detection; refusals that write nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

import statevault as sv
from statevault.cli.main import main
from statevault.errors import CheckpointError, CorruptCheckpointError
from statevault.interop import detect, import_checkpoint
from tests.progress_helpers import Recorder


def _metadata(path: Path) -> object:
    from statevault.checkpoint import open_checkpoint
    from statevault.format import tree

    checkpoint = open_checkpoint(path)
    return tree.decode(checkpoint.manifest.metadata, lambda i: None, str(path))


def test_tensorflow_checkpoint(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed (CI installs it)")
    kernel = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
    half = tf.Variable(tf.constant([1.5, -2.25], dtype=tf.bfloat16))
    counter = tf.Variable(7, dtype=tf.int64)
    prefix = tf.train.Checkpoint(kernel=kernel, half=half, counter=counter).write(
        str(tmp_path / "tf" / "ckpt")
    )
    assert detect(prefix) == "tf" and detect(prefix + ".index") == "tf"
    recorder = Recorder()
    report = import_checkpoint(prefix, tmp_path / "sv", progress=recorder)
    assert recorder.totals == [6 * 4 + 2 * 2 + 8] == [sum(recorder.advances)]  # kernel, half, n
    state = sv.load(tmp_path / "sv")
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    np.testing.assert_array_equal(state["kernel" + suffix], kernel.numpy())
    assert state["counter" + suffix] == 7 and state["counter" + suffix].dtype == np.int64
    assert state["half" + suffix].dtype == tf.bfloat16  # numpy has none: kept as TF's
    np.testing.assert_array_equal(state["half" + suffix].numpy(), half.numpy())
    assert report.kind == "tf" and report.arrays == 3
    assert report.skipped == ["_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert _metadata(tmp_path / "sv") == {"import": {"from": "tf", "source": prefix}}


def test_tensorflow_checkpoint_directory(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed (CI installs it)")
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(w=tf.Variable([1.0, 2.0])), str(tmp_path / "tf"), max_to_keep=2
    )
    manager.save()
    manager.checkpoint.w.assign([3.0, 4.0])
    manager.save()
    import_checkpoint(tmp_path / "tf", tmp_path / "sv")  # the latest of the directory
    loaded = sv.load(tmp_path / "sv")
    np.testing.assert_array_equal(loaded["w/.ATTRIBUTES/VARIABLE_VALUE"], [3.0, 4.0])


def test_safetensors_file_keeps_its_metadata(tmp_path: Path) -> None:
    arrays = {"b": np.ones((2, 2), dtype=np.float16), "a": np.arange(3, dtype=np.uint8)}
    save_numpy(arrays, tmp_path / "w.safetensors", metadata={"format": "np", "origin": "test"})
    report = import_checkpoint(tmp_path / "w.safetensors", tmp_path / "sv")
    loaded = sv.load(tmp_path / "sv")
    assert report.kind == "safetensors" and set(loaded) == {"a", "b"}
    assert all(
        np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in arrays.items()
    )
    assert _metadata(tmp_path / "sv") == {
        "import": {"from": "safetensors", "source": str(tmp_path / "w.safetensors")},
        "safetensors_metadata": {"format": "np", "origin": "test"},
    }
    # dtypes numpy lacks come back as torch tensors
    save_torch({"h": torch.tensor([1.0, 2.5]).bfloat16()}, tmp_path / "bf.safetensors")
    import_checkpoint(tmp_path / "bf.safetensors", tmp_path / "sv_bf")
    assert torch.equal(sv.load(tmp_path / "sv_bf")["h"], torch.tensor([1.0, 2.5]).bfloat16())


def test_torch_save_file(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3)).sum().backward()
    opt.step()
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 4}, tmp_path / "c.pt"
    )
    assert detect(str(tmp_path / "c.pt")) == "torch"
    report = import_checkpoint(tmp_path / "c.pt", tmp_path / "sv")
    fresh = torch.nn.Linear(3, 2)
    state = sv.load(tmp_path / "sv")
    fresh.load_state_dict(state["model"])
    assert torch.equal(fresh.weight, model.weight) and state["epoch"] == 4
    momentum = state["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, opt.state[model.weight]["momentum_buffer"])
    assert report.arrays == 4  # weight, bias, two momentum buffers


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.getcwd, ())  # type: ignore[return-value]


def test_torch_file_with_more_than_weights_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only") as caught:
        import_checkpoint(tmp_path / "evil.pt", tmp_path / "sv")
    assert "never runs pickled code" in str(caught.value)
    assert not (tmp_path / "sv").exists()
    assert main(["import", str(tmp_path / "evil.pt"), "--to", str(tmp_path / "sv")]) == 2
    assert not (tmp_path / "sv").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_directory(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    state = {"model": model.state_dict(), "step": torch.tensor(12)}
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    report = import_checkpoint(tmp_path / "dcp", tmp_path / "sv", from_="dcp")
    loaded = sv.load(tmp_path / "sv")
    assert report.kind == "dcp" and set(loaded["model"]) == set(model.state_dict())
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
    assert int(loaded["step"]) == 12


def test_cli_json_detection_and_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"w": torch.arange(4)}, tmp_path / "c.pt")
    assert main(["import", str(tmp_path / "c.pt"), "--to", str(tmp_path / "sv"), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["from"] == "torch" and document["arrays"] == 1
    assert torch.equal(sv.load(tmp_path / "sv")["w"], torch.arange(4))
    assert main(["import", str(tmp_path / "c.pt"), "--to", str(tmp_path / "sv")]) == 2  # exists
    assert (
        main(["import", str(tmp_path / "c.pt"), "--to", str(tmp_path / "sv"), "--overwrite"]) == 0
    )
    assert "IMPORTED" in capsys.readouterr().out
    (tmp_path / "junk.bin").write_bytes(b"just some bytes")
    for source, kind, message in [
        ("junk.bin", None, "cannot tell"),
        ("missing", None, "nothing to import"),
        ("junk.bin", "safetensors", "not a safetensors file"),
        ("junk.bin", "torch", "cannot read"),
        ("junk.bin", "tf", "not a TensorFlow checkpoint"),
        ("junk.bin", "dcp", "not a DCP checkpoint"),
    ]:
        extra = ["--from", kind] if kind else []
        target = tmp_path / "new"
        assert main(["import", str(tmp_path / source), "--to", str(target), *extra]) == 2
        assert message in capsys.readouterr().err, (source, kind)
        assert not target.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_is_never_auto_detected(tmp_path: Path) -> None:
    """DCP's .metadata is a pickle: detection refuses it, saying how to opt in."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path / "dcp"))
    with pytest.raises(CheckpointError, match="pickle") as caught:
        detect(str(tmp_path / "dcp"))
    assert str(tmp_path / "dcp") in str(caught.value) and "from_='dcp'" in str(caught.value)
    with pytest.raises(CheckpointError, match="--from dcp"):
        import_checkpoint(tmp_path / "dcp", tmp_path / "sv")
    assert not (tmp_path / "sv").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_damaged_dcp_is_a_corrupt_checkpoint_error(tmp_path: Path) -> None:
    """torch's CheckpointException is a BaseException: it must not escape as one."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(64)}, checkpoint_id=str(tmp_path / "dcp"))
    for data in (tmp_path / "dcp").glob("*.distcp"):
        os.truncate(data, 10)
    with pytest.raises(CorruptCheckpointError, match="DCP") as caught:
        import_checkpoint(tmp_path / "dcp", tmp_path / "sv", from_="dcp")
    assert str(tmp_path / "dcp") in str(caught.value)
    assert "Traceback" not in str(caught.value)
    assert not (tmp_path / "sv").exists()


def test_import_reports_progress_in_bytes(tmp_path: Path) -> None:
    arrays = {f"t{i}": np.full(1000 + i, i, dtype=np.float32) for i in range(5)}
    save_numpy(arrays, tmp_path / "w.safetensors")
    recorder = Recorder()
    import_checkpoint(tmp_path / "w.safetensors", tmp_path / "a", progress=recorder)
    assert recorder.totals == [sum(a.nbytes for a in arrays.values())]
    assert len(recorder.advances) == len(arrays) and sum(recorder.advances) == recorder.totals[0]

    torch.save({"w": torch.ones(5000), "b": torch.zeros(300)}, tmp_path / "c.pt")
    recorder = Recorder()
    import_checkpoint(tmp_path / "c.pt", tmp_path / "b", progress=recorder)
    assert recorder.totals == [os.path.getsize(tmp_path / "c.pt")]
    assert sum(recorder.advances) == recorder.totals[0] and all(n > 0 for n in recorder.advances)
