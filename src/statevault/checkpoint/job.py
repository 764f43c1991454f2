"""Write: one rank's share of a save, from staged bytes to shard files, and the manifest last.

A :class:`SaveJob` is what a save knows between its stage and its commit: the plan, where its
shards go (``written``: a temporary directory, or the target prefix itself on an object store),
which leaves go into which file, and the rows each written file and tensor produced. Its files
are written in parallel (engine/writer.py), each tensor checksummed as it goes; an incremental
save first shares the files of the previous checkpoint that it would write again byte for byte
(checkpoint/reuse.py). ``commit`` writes the manifest last and publishes it
(checkpoint/commit.py).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from statevault.checkpoint.commit import LocalCommit, ObjectCommit
from statevault.checkpoint.reuse import Baseline, shareable_rows, unchanged
from statevault.engine.cancel import Cancel, shielded
from statevault.engine.parallel import cpu_threads, map_threads
from statevault.engine.plan import SavePlan
from statevault.engine.writer import PendingTensor, shard_header, write_files
from statevault.errors import CheckpointError
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
    # An incremental save: the previous checkpoint, and which files may repeat one of its files.
    baseline: Baseline | None = None
    candidates: dict[int, str] = field(default_factory=dict)
    hashed: set[int] = field(default_factory=set)  # the files whose rows get content hashes
    written_bytes: int = 0
    shared_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def abandon_written(self) -> None:
        """Remove what this save wrote (its temporary, or its tagged objects), to the end even
        through a Ctrl-C."""
        shielded(lambda: self.committer.abandon(self.written))

    def write(self, file_indices: Sequence[int], staged: Mapping[int, memoryview]) -> None:
        """Write the shard files ``file_indices`` from staged leaf bytes, sharing those that
        repeat a file of the previous checkpoint (an incremental save)."""
        candidates = [i for i in file_indices if i in self.candidates]
        threads = max(1, min(cpu_threads(), len(candidates)))
        shared = map_threads(
            lambda i: self._share(i, staged), candidates, threads, "statevault-share"
        )
        done = {i for i, ok in zip(candidates, shared, strict=True) if ok}
        to_write = [i for i in file_indices if i not in done]
        batch = [(self._name(i), self._pending(i, staged)) for i in to_write]
        rows, tensors = write_files(
            self.written.storage,
            self.written.path,
            batch,
            self._metadata(),
            self.cancel,
            {self._name(i) for i in to_write if i in self.hashed},
        )
        self.file_rows += rows
        self.written_bytes += sum(row.size for row in rows)
        for i, written in zip(to_write, tensors, strict=True):
            for leaf, row in zip(self.files[i], written, strict=True):
                self.tensor_rows[leaf] = row

    def _name(self, index: int) -> str:
        return shard_name(index, self.rank, tag=self.committer.shard_tag())

    def _metadata(self) -> dict[str, str]:
        shard_format = "pt" if "torch" in self.plan.frameworks() else "np"
        return {"format": shard_format, "writer": "statevault"}

    def _pending(self, index: int, staged: Mapping[int, memoryview]) -> list[PendingTensor]:
        leaves = self.plan.leaves
        return [
            PendingTensor(
                leaves[j].path,
                leaves[j].adapter.framework,
                leaves[j].spec.dtype,
                leaves[j].spec.shape,
                staged[j],
                leaves[j].spec.attrs,
            )
            for j in self.files[index]
        ]

    def _share(self, index: int, staged: Mapping[int, memoryview]) -> bool:
        """Share the baseline file that file ``index`` would repeat byte for byte (hashed
        here, off the training thread); False when anything differs (it is written then)."""
        assert self.baseline is not None
        self.cancel.check()
        previous = self.candidates[index]
        rows = shareable_rows(
            self.baseline,
            previous,
            self.files[index],
            staged,
            lambda: shard_header(self._pending(index, staged), self._metadata()),
        )
        if rows is None:
            return False
        name = self._name(index)
        source = self.baseline.location.join(previous).path
        self.written.storage.share_file(source, self.written.join(name).path)
        entry = self.baseline.files[previous]
        with self._lock:  # shared from several threads
            self.file_rows.append(dataclasses.replace(entry, name=name))
            self.shared_bytes += entry.size
            for leaf, row in zip(self.files[index], rows, strict=True):
                self.tensor_rows[leaf] = dataclasses.replace(row, file=name)
        return True

    def unchanged_paths(self) -> frozenset[str]:
        """The key paths whose tensor equals the baseline's (stable at the next save)."""
        if self.baseline is None:
            return frozenset()
        before = self.baseline.by_path()
        return frozenset(
            row.path for row in self.tensor_rows.values() if unchanged(row, before.get(row.path))
        )

    def stable_files(self) -> list[str]:
        """The files of this save whose every tensor is unchanged since the baseline (shared,
        or written again under a new layout): what the next save lays out the same way."""
        if self.baseline is None:
            return []
        unchanged = self.unchanged_paths()
        by_file: dict[str, list[str]] = {}
        for leaf, row in self.tensor_rows.items():
            by_file.setdefault(row.file, []).append(self.plan.leaves[leaf].path)
        return sorted(n for n, paths in by_file.items() if set(paths) <= unchanged)

    def next_baseline(self) -> Baseline:
        """This save's own files as the baseline of the next one (once it is committed)."""
        rows: dict[str, list[TensorEntry]] = {}
        for row in self.tensor_rows.values():
            rows.setdefault(row.file, []).append(row)
        return Baseline(
            self.target,
            {f.name: f for f in self.file_rows},
            {name: sorted(found, key=lambda r: r.offset) for name, found in rows.items()},
            self.unchanged_paths(),
        )

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
