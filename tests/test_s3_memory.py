"""A save to an object store streams from the staged tensors in multipart parts: the process
never holds a whole shard, so its peak memory grows by a few parts, not by the state's size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.s3_server import S3Bucket

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    import statevault as sv

    url, options = sys.argv[1], json.loads(sys.argv[2])
    # 16 tensors of 32 MiB: 512 MiB in 8 shard files of 64 MiB, uploaded 4 at a time.
    state = {f"t{i}": torch.full((8 << 20,), float(i)) for i in range(16)}
    sv.save({"warmup": torch.ones(4)}, url + "-warmup", storage_options=options)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sv.save(state, url, storage_options=options)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loaded = sv.load(url, storage_options=options, only="t7")
    assert float(loaded[0]) == 7.0 and loaded.numel() == 8 << 20
    print(json.dumps({"grew_mib": (after - before) / 1024}))
    """
)


@pytest.mark.s3
def test_upload_memory_is_bounded_by_a_few_parts(s3_bucket: S3Bucket) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            f"{s3_bucket.url}/big",
            json.dumps(s3_bucket.storage_options),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    grew = json.loads(result.stdout.strip().splitlines()[-1])["grew_mib"]
    # The state is 512 MiB; at most 4 uploads of 16 MiB parts, about 3 parts each, are in
    # memory at once (storage/fsspec_storage.py): the bound does not grow with the state.
    assert grew < 256, f"peak memory grew by {grew:.0f} MiB during a 512 MiB save"
