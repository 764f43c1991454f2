"""Write: one rank's share of a save, from staged bytes to shard files, and the manifest last.

A :class:`SaveJob` is what a save knows between its stage and its commit: the plan, where its
shards go (``written``: a temporary directory, or the target prefix itself on an object store),
which leaves go into which file, and the rows each written file and tensor produced. Its files
are written in parallel (engine/writer.py), each tensor checksummed as it goes; ``commit``
writes the manifest last and publishes it (checkpoint/commit.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from statevault.checkpoint.commit import LocalCommit, ObjectCommit
from statevault.engine.cancel import Cancel, shielded
from statevault.engine.layout import assign_files
from statevault.engine.plan import SavePlan
from statevault.engine.writer import PendingTensor, write_files
from statevault.errors import CheckpointError
from statevault.format import dtypes
from statevault.format import manifest as manifest_module
from statevault.format.manifest import FileEntry, Manifest, TensorEntry, serialize_manifest
from statevault.format.names import MANIFEST_NAME, shard_name
from statevault.storage.location import Location


@dataclass
class SaveJob:
    """One rank's share of one save, between its stage and its commit."""

    plan: SavePlan
    target: Location
    overwrite: bool
    extra_info: Mapping[str, Any] | None
    committer: LocalCommit | ObjectCommit
    written: Location  # where the shards go: a temporary directory, or the target itself
    files: list[list[int]]  # leaf indices per shard file
    asynchronous: bool
    timings: dict[str, float] = field(default_factory=dict)
    file_rows: list[FileEntry] = field(default_factory=list)
    tensor_rows: dict[int, TensorEntry] = field(default_factory=dict)
    rank: int = 0  # the process writing these shards (their names carry it)
    cancel: Cancel = field(default_factory=Cancel)

    def abandon_written(self) -> None:
        """Remove what this save wrote (its temporary, or its tagged objects), to the end even
        through a Ctrl-C."""
        shielded(lambda: self.committer.abandon(self.written))

    def write(self, file_indices: Sequence[int], staged: Mapping[int, memoryview]) -> None:
        """Write the shard files ``file_indices`` from staged leaf bytes."""
        plan = self.plan
        batch = [
            (
                shard_name(i, self.rank, tag=self.committer.shard_tag()),
                [
                    PendingTensor(
                        plan.leaves[j].path,
                        plan.leaves[j].adapter.framework,
                        plan.leaves[j].spec.dtype,
                        plan.leaves[j].spec.shape,
                        staged[j],
                        plan.leaves[j].spec.attrs,
                    )
                    for j in self.files[i]
                ],
            )
            for i in file_indices
        ]
        shard_format = "pt" if "torch" in plan.frameworks() else "np"
        rows, tensors = write_files(
            self.written.storage,
            self.written.path,
            batch,
            {"format": shard_format, "writer": "statevault"},
            self.cancel,
        )
        self.file_rows += rows
        for i, written in zip(file_indices, tensors, strict=True):
            for leaf, row in zip(self.files[i], written, strict=True):
                self.tensor_rows[leaf] = row

    def commit(self, manifest: Manifest) -> Manifest:
        """Write the manifest, then publish it (the rename, or nothing more on object stores)."""
        data = serialize_manifest(manifest)
        if len(data) > manifest_module.MAX_MANIFEST_BYTES:  # no reader would accept it
            raise CheckpointError(
                f"{self.target.url}: the manifest would be {len(data) / 2**20:.0f} MiB, over the "
                f"{manifest_module.MAX_MANIFEST_BYTES / 2**20:.0f} MiB readers accept (too many "
                "tensors times ranks); save fewer, larger tensors or from fewer ranks"
            )
        self.cancel.check()  # the last moment a save can be abandoned: the manifest commits it
        self.committer.before_manifest(self.target, self.overwrite)
        manifest_path = self.written.join(MANIFEST_NAME).path
        with self.written.storage.open_write(manifest_path) as handle:
            handle.write(memoryview(data))
        started = time.perf_counter()
        self.committer.publish(self.written, self.target, self.overwrite)
        self.timings["commit_s"] = time.perf_counter() - started
        return manifest


def group_files(
    plan: SavePlan, leaves: Sequence[int], max_file_bytes: int | None
) -> list[list[int]]:
    """``leaves`` (leaf indices) grouped into shard files of at most ``max_file_bytes`` (None: as
    the layout rule has it), each file's leaves ordered for alignment."""
    groups = assign_files(
        [plan.leaves[i].spec.nbytes for i in leaves], max_file_bytes=max_file_bytes
    )
    return _aligned(plan, [[leaves[j] for j in members] for members in groups])


def _aligned(plan: SavePlan, files: list[list[int]]) -> list[list[int]]:
    """Order each file's leaves by item size, largest first: every size is a multiple of its
    (power of two) item size, so each tensor starts aligned to it, and views need no copy."""
    itemsize = {i: dtypes.lookup(leaf.spec.dtype).itemsize for i, leaf in enumerate(plan.leaves)}
    return [sorted(members, key=lambda i: (-itemsize[i], i)) for members in files]
