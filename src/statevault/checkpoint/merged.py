"""What rank 0 commits: every rank's part merged into one manifest with the save's info.

A save of one process merges into a manifest holding every row (format 1 or 2, parts.py); a job
of several ranks into the format-3 manifest and its index table, each rank having written its
own index (indexed_parts.py).
"""

from __future__ import annotations

from statevault.checkpoint.indexed_parts import indexed_part, merge_indexed
from statevault.checkpoint.info import checkpoint_info
from statevault.checkpoint.job import SaveJob
from statevault.checkpoint.parts import Part, merge, part_of
from statevault.format.indexed import index_name, table_name
from statevault.format.manifest import Manifest


def rank_part(job: SaveJob, world: int) -> Part:
    """This rank's part; in a job of several ranks (format 3) its index is written first."""
    if world == 1:
        return part_of(job)
    part, index = indexed_part(job)
    name = index_name(job.rank, job.committer.shard_tag())
    job.written.storage.write_bytes(job.written.join(name).path, index)
    return part


def merged_manifest(job: SaveJob, parts: list[Part], started: float, incremental: bool) -> Manifest:
    """The manifest of every rank's ``parts`` (rank order), the index table written beside it
    for a job of several ranks, with the save's info (timings, bytes written and shared)."""
    world = len(parts)
    if world == 1:
        manifest = merge(job.plan, parts, job.target.url)
    else:
        table = table_name(job.committer.shard_tag())
        manifest, table_bytes = merge_indexed(job.plan, parts, job.target.url, table)
        job.written.storage.write_bytes(job.written.join(table).path, table_bytes)
    mode = "async" if job.asynchronous else "sync"
    manifest.info = checkpoint_info(job.plan, job.timings, job.extra_info, started, mode)
    save_info = manifest.info["save"]
    if incremental:  # what this save wrote, and what it shared with the previous one
        save_info["bytes_written"] = sum(p.written_bytes for p in parts)
        save_info["bytes_shared"] = sum(p.shared_bytes for p in parts)
        if world == 1:  # in a job, each rank's are in its index: O(ranks) otherwise
            save_info["stable_files"] = sorted(n for p in parts for n in p.stable_files)
    if world > 1:
        save_info["bytes"] = sum(p.row_bytes for p in parts)
        save_info["file_bytes"] = sum(p.file_bytes for p in parts)
        slowest = max(p.timings.get("write_s", 0.0) for p in parts)
        save_info["slowest_rank_write_s"] = round(slowest, 6)
    return manifest
