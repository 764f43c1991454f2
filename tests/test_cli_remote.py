"""The command line on runs and checkpoints at URLs (S3 via moto's server, memory://).

What must hold: ``ls``, ``rm``, ``gc``, ``inspect``, ``verify`` and ``diff`` take URLs, with
storage options from ``--storage-option KEY=VALUE`` (dotted keys nest) or
``$STATEVAULT_STORAGE_OPTIONS``; ``rm`` / ``gc`` refuse a run whose lease is live, delete the
manifest first, and keep a young manifest-less prefix; ``verify --only KEY`` and
``inspect --only KEY`` look at one subtree, and ``verify --only`` reads only its bytes (counted
on the S3 client).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import statevault as sv
from statevault.checkpoint.commit import marker_bytes
from statevault.cli.main import main
from tests.manager_helpers import small_state
from tests.s3_server import S3Bucket, has_manifest, record_s3_calls

pytestmark = pytest.mark.s3


def _flags(options: dict[str, Any]) -> list[str]:
    client = options["client_kwargs"]
    pairs = {
        "key": options["key"],
        "secret": options["secret"],
        "client_kwargs.endpoint_url": client["endpoint_url"],
        "client_kwargs.region_name": client["region_name"],
    }
    return [arg for k, v in pairs.items() for arg in ("--storage-option", f"{k}={v}")]


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = main(list(argv))
    out = capsys.readouterr().out
    try:
        return code, json.loads(out)
    except ValueError:
        return code, out


def _run(bucket: S3Bucket, steps: list[int]) -> str:
    url = f"{bucket.url}/run"
    with sv.CheckpointManager(url, max_to_keep=None, storage_options=bucket.storage_options) as m:
        for step in steps:
            m.save(step, small_state(step), metrics={"loss": float(step)})
    return url


def test_ls_rm_gc_of_an_s3_run(s3_bucket: S3Bucket, capsys: pytest.CaptureFixture[str]) -> None:
    url = _run(s3_bucket, [1, 2, 3])
    flags = _flags(s3_bucket.storage_options)
    code, doc = _cli(capsys, "ls", url, "--json", *flags)
    assert code == 0
    assert [c["step"] for c in doc["checkpoints"]] == [1, 2, 3]
    assert {c["status"] for c in doc["checkpoints"]} == {"committed"}
    assert doc["checkpoints"][0]["bytes"] > 4096 and doc["writer"] is None
    assert doc["run"]["sessions"] == 1

    code, doc = _cli(capsys, "rm", url, "--step", "1", "--json", *flags)  # a dry run
    assert code == 0 and doc["dry_run"] and has_manifest(s3_bucket.fs, f"{url}/step_000000001")
    with sv.CheckpointManager(url, storage_options=s3_bucket.storage_options):
        code, _ = _cli(capsys, "rm", url, "--step", "1", "--yes", *flags)
        assert code == 2, "refused while a live manager holds the lease"
        code, doc = _cli(capsys, "ls", url, "--json", *flags)
        assert doc["writer"] is not None
    code, doc = _cli(capsys, "rm", url, "--step", "1", "--yes", "--json", *flags)
    assert code == 0 and doc["items"][0]["deleted"]
    assert not s3_bucket.fs.exists(f"{url}/step_000000001")

    orphan = f"{url}/step_000000009/data-r00000-00000-0123abcd.safetensors"
    s3_bucket.fs.pipe_file(f"{url}/step_000000009/.statevault-save-0123abcd", marker_bytes())
    s3_bucket.fs.pipe_file(orphan, b"x" * 10)
    code, doc = _cli(capsys, "gc", url, "--yes", "--json", *flags)
    assert code == 0 and doc["items"] == [] and "step_000000009" in " ".join(doc["notes"])
    assert s3_bucket.fs.exists(orphan), "young: may be a save in flight"
    code, doc = _cli(capsys, "gc", url, "--yes", "--older-than", "0", "--json", *flags)
    assert [item["name"] for item in doc["items"]] == ["step_000000009"]
    assert not s3_bucket.fs.exists(orphan)
    code, doc = _cli(capsys, "gc", url, "--keep-last", "1", "--json", *flags)
    assert [item["step"] for item in doc["items"]] == [2]


def test_verify_only_reads_only_the_subtrees_bytes(
    s3_bucket: S3Bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{s3_bucket.url}/ck"
    model = np.arange(1 << 16, dtype=np.float32)  # 256 KiB
    optimizer = np.ones(1 << 20, dtype=np.float32)  # 4 MiB
    state = {"model": {"w": model}, "optimizer": {"m": optimizer}, "step": 3}
    sv.save(state, url, storage_options=s3_bucket.storage_options)
    flags = _flags(s3_bucket.storage_options)

    with record_s3_calls() as log:
        code, doc = _cli(capsys, "verify", url, "--only", "model", "--json", *flags)
    assert code == 0 and doc["ok"] and doc["tensors"] == 1
    assert doc["bytes_checked"] == model.nbytes
    fetched = sum(call.content_length or 0 for call in log.of("GetObject"))
    assert model.nbytes <= fetched < model.nbytes + (64 << 10), fetched

    code, doc = _cli(capsys, "verify", url, "--json", *flags)
    assert doc["bytes_checked"] == model.nbytes + optimizer.nbytes

    code, doc = _cli(capsys, "inspect", url, "--only", "optimizer", "--json", *flags)
    assert code == 0 and [t["path"] for t in doc["tensors"]] == ["optimizer/m"]
    code, _ = _cli(capsys, "verify", url, "--only", "nope", *flags)
    assert code == 2


def test_diff_and_env_storage_options(
    s3_bucket: S3Bucket, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = f"{s3_bucket.url}/a", f"{s3_bucket.url}/b"
    sv.save(small_state(1), a, storage_options=s3_bucket.storage_options)
    sv.save(small_state(2), b, storage_options=s3_bucket.storage_options)
    monkeypatch.setenv("STATEVAULT_STORAGE_OPTIONS", json.dumps(s3_bucket.storage_options))
    code, _ = _cli(capsys, "diff", a, a, "--json")
    assert code == 0
    code, _ = _cli(capsys, "diff", a, b, "--json")
    assert code == 1
    code, out = _cli(capsys, "verify", b)
    assert code == 0 and "OK" in out


def test_memory_run_listing(capsys: pytest.CaptureFixture[str]) -> None:
    url = "memory://sv-cli-remote/run"
    with sv.CheckpointManager(url) as mgr:
        mgr.save(5, small_state(5))
    code, doc = _cli(capsys, "ls", url, "--json")
    assert code == 0 and [c["step"] for c in doc["checkpoints"]] == [5]
    code, _ = _cli(capsys, "ls", "memory://sv-cli-remote/nothing-here")
    assert code == 2
