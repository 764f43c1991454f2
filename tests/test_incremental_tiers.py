"""Incremental checkpoints with two tiers: the replica on a real S3 protocol server (moto) gets
each unchanged shard file uploaded once; later checkpoints copy it server-side (CopyObject),
survive the replica's retention deleting the checkpoint that first uploaded it, and a new
manager of the run (a restart) goes on copying instead of uploading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import statevault as sv
from statevault.manager.naming import step_dir_name
from tests.s3_server import CallLog, S3Bucket, manifest_body, record_s3_calls
from tests.test_incremental import LoraRun

pytestmark = pytest.mark.s3

UPLOADS = ("PutObject", "CreateMultipartUpload", "UploadPart")
COPIES = ("CopyObject", "UploadPartCopy")


def _manager(local: Path, bucket: S3Bucket) -> sv.CheckpointManager:
    replica = sv.Replica(
        f"{bucket.url}/run", every=1, max_to_keep=2, storage_options=bucket.storage_options
    )
    return sv.CheckpointManager(local, max_to_keep=2, replicate_to=replica)


def _base_file(bucket: S3Bucket, step: int) -> str:
    """The object key of the replica's shard file that holds the frozen base weight."""
    prefix = f"{bucket.url}/run/{step_dir_name(step)}"
    body = manifest_body(bucket.fs, prefix)
    (name,) = {row["file"] for row in body["tensors"] if row["path"] == "base/weight"}
    return f"{prefix}/{name}".split("/", 3)[3]  # s3://bucket/<key>


def _operations_on(log: CallLog, key: str) -> set[str]:
    return {call.operation for call in log.calls if call.key == key}


def test_the_replica_uploads_the_frozen_base_once_and_copies_it_after(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    lora = LoraRun()
    with record_s3_calls() as log:
        with _manager(tmp_path / "run", s3_bucket) as mgr:
            for step in range(1, 5):
                lora.step()
                mgr.save(step, lora.state())
                mgr.wait()  # the replica copy of this step is committed
        base_keys = {}
        for step in (3, 4):  # the replica keeps 2: steps 1 and 2 were deleted by its retention
            key = _base_file(s3_bucket, step)
            base_keys[step] = key
            ops = _operations_on(log, key)
            assert ops & set(COPIES) and not ops & set(UPLOADS), (step, ops)
        uploads_of_base = [
            c
            for c in log.calls
            if c.operation in UPLOADS and c.key.endswith(base_keys[4].rsplit("/", 1)[1])
        ]
        # Uploaded by step 1 only: base files of steps 2..4 are server-side copies.
        assert {c.key.split("/")[-2] for c in uploads_of_base} <= {step_dir_name(1)}, (
            uploads_of_base
        )
        assert uploads_of_base, "the first replica checkpoint uploads the base"

        # A restart: a new manager learns the replica's blobs from its newest checkpoint.
        lora.step()
        log.calls.clear()
        with _manager(tmp_path / "run", s3_bucket) as mgr:
            mgr.save(5, lora.state())
            mgr.wait()
        ops = _operations_on(log, _base_file(s3_bucket, 5))
        assert ops & set(COPIES) and not ops & set(UPLOADS), ops

    for step in (4, 5):
        url = f"{s3_bucket.url}/run/{step_dir_name(step)}"
        assert sv.verify(url, storage_options=s3_bucket.storage_options).ok
    restored = LoraRun(seed=7)
    sv.load(
        f"{s3_bucket.url}/run/{step_dir_name(5)}",
        into=restored.state(),
        storage_options=s3_bucket.storage_options,
    )
    assert torch.equal(restored.base.weight, lora.base.weight)
    assert torch.equal(restored.a, lora.a) and torch.equal(restored.b, lora.b)
