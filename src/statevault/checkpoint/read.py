"""Read: the tensors a load needs, each into the layout it is going to, then the tree decoded.

    pick per-rank branches -> find DTensor destinations -> read plain tensors (fast path)
    -> read boxes of targeted and sharded tensors (ranged, verified) -> values by node id
    -> decode the tree around them

Plain tensors with no DTensor destination take the reader's fast path (a mapped local file or
parallel ranged reads: :func:`read_plain`). A tensor going to a DTensor is read only for the box
this rank holds; a sharded tensor going anywhere else is assembled whole from its chunks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from statevault.adapters import adapter_named
from statevault.checkpoint.open import OpenCheckpoint
from statevault.engine.regions import RegionReader
from statevault.engine.reshard import (
    Logical,
    box_entry,
    plain_logical,
    read_box,
    sharded_logical,
    spans_of_box,
)
from statevault.errors import CheckpointError, CorruptCheckpointError
from statevault.format import tree as tree_codec
from statevault.format import tree_paths
from statevault.format.geometry import Box
from statevault.format.manifest import TensorEntry

WHOLE_TREE = object()

# Resharding reads from an object store are fetched ahead in merged requests (engine/prefetch);
# False reads each span on its own (benchmarks/s3_reshard_bench.py compares the two).
PREFETCH_REMOTE = True


@dataclass
class LoadedTensors:
    """The values of a load's tensor nodes, by manifest id."""

    plain: dict[int, Any] = field(default_factory=dict)
    sharded: dict[int, Any] = field(default_factory=dict)
    bytes_read: int = 0


def read_tensors(
    checkpoint: OpenCheckpoint,
    node: Any,
    into: Mapping[str, Any] | None,
    device: str | None,
    verify: bool,
    pick_rank: Callable[[int], int],
    all_files: bool = True,
) -> LoadedTensors:
    """The values of the tensor nodes of ``node``. ``all_files``: check every file a load may
    touch (a whole load), else only those of the tensors read (a partial one)."""

    def read_plain(ids: list[int]) -> dict[int, Any]:
        return _read_plain(checkpoint, verify, device, ids, all_files)

    manifest = checkpoint.manifest
    targets = _targets(checkpoint, node, into, pick_rank)
    result = LoadedTensors()
    plain_ids = sorted(tree_paths.tensor_ids(node) - {i for kind, i in targets if kind == "tensor"})
    plain_ids = [i for i in plain_ids if 0 <= i < len(manifest.tensors)]
    sharded_ids = sorted(tree_paths.tensor_ids(node, tag="sharded"))
    if not targets and not sharded_ids:
        result.plain = read_plain(plain_ids)
        return result
    with RegionReader(checkpoint.reader, verify) as regions:
        if PREFETCH_REMOTE and not checkpoint.location.local:
            read_plain([])  # the file checks of the load, before any tensor is read
            _read_prefetched(checkpoint, regions, plain_ids, targets, sharded_ids, device, result)
            result.bytes_read = regions.bytes_read
            return result
        result.plain = read_plain(plain_ids)
        for (kind, index), target in targets.items():
            value = _read_into_layout(regions, _logical(checkpoint, kind, index), target)
            (result.plain if kind == "tensor" else result.sharded)[index] = value
        for index in sharded_ids:
            if ("sharded", index) not in targets:
                logical = _logical(checkpoint, "sharded", index)
                result.sharded[index] = _read_whole(regions, logical, device)
        result.bytes_read = regions.bytes_read
    return result


@dataclass
class _Job:
    """One tensor of a prefetched load: the spans it reads, and the read itself."""

    kind: str  # "tensor" | "sharded"
    index: int
    spans: list[tuple[Any, int, int]]
    read: Callable[[], Any]


def _read_prefetched(
    checkpoint: OpenCheckpoint,
    regions: RegionReader,
    plain_ids: list[int],
    targets: Mapping[tuple[str, int], Any],
    sharded_ids: list[int],
    device: str | None,
    result: LoadedTensors,
) -> None:
    """Every tensor of a load from an object store, through one prefetch plan.

    Round trips cost most there: every span the load reads is announced first and fetched in
    merged requests (engine/prefetch.py). The tensors are read in the order their bytes lie in
    the shards (by how far into its shard each tensor's first span is: the shards of the ranks
    of one save list their tensors in the same order), and the requests are fetched in that
    order, so a request is released soon after it arrives and the bytes held stay near the
    prefetch window instead of growing to the whole load."""
    from statevault.adapters.torch_dtensor import local_box

    jobs = []
    for index in plain_ids:
        logical = plain_logical(checkpoint.manifest, index)
        jobs.append(_whole_job(regions, logical, "tensor", index, device))
    for (kind, index), target in targets.items():
        logical = _logical(checkpoint, kind, index)
        read = partial(_read_into_layout, regions, logical, target)
        jobs.append(_Job(kind, index, spans_of_box(logical, local_box(target)), read))
    for index in sharded_ids:
        if ("sharded", index) not in targets:
            logical = _logical(checkpoint, "sharded", index)
            jobs.append(_whole_job(regions, logical, "sharded", index, device))
    sizes = {f.name: max(f.size, 1) for f in checkpoint.manifest.files}

    def position(job: _Job) -> tuple[float, str]:
        if not job.spans:
            return (0.0, "")
        entry, start, _ = job.spans[0]
        return ((entry.offset + start) / sizes.get(entry.file, 1), entry.file)

    jobs.sort(key=position)
    regions.prefetch([span for job in jobs for span in job.spans])
    for job in jobs:
        (result.plain if job.kind == "tensor" else result.sharded)[job.index] = job.read()


def _whole_job(
    regions: RegionReader, logical: Logical, kind: str, index: int, device: str | None
) -> _Job:
    box = Box((0,) * len(logical.shape), logical.shape)
    read = partial(_read_whole, regions, logical, device)
    return _Job(kind, index, spans_of_box(logical, box), read)


def _logical(checkpoint: OpenCheckpoint, kind: str, index: int) -> Logical:
    manifest = checkpoint.manifest
    count = len(manifest.tensors) if kind == "tensor" else len(manifest.sharded)
    if not 0 <= index < count:
        what = "tensor" if kind == "tensor" else "sharded tensor"
        raise CorruptCheckpointError(f"{checkpoint.directory}: tree refers to {what} {index}")
    if kind == "tensor":
        return plain_logical(manifest, index)
    return sharded_logical(manifest, index)


def _targets(
    checkpoint: OpenCheckpoint,
    node: Any,
    into: Mapping[str, Any] | None,
    pick_rank: Callable[[int], int],
) -> dict[tuple[str, int], Any]:
    """DTensor destinations whose global shape and dtype match what was saved."""
    if into is None or "torch.distributed.tensor" not in sys.modules:
        return {}  # no DTensor can exist here (and importing dtensor would import torch)
    from statevault.adapters.torch_dtensor import dtensor_class

    if dtensor_class() is None:  # no DTensor can exist in this process
        return {}
    from statevault.distributed.targets import find_targets

    fitting = {}
    for key, target in find_targets(into, node, pick_rank).items():
        try:
            logical = _logical(checkpoint, *key)
        except CorruptCheckpointError:
            continue  # the decoder names the bad reference
        same_dtype = str(target.dtype).removeprefix("torch.") == logical.entry.dtype
        if tuple(target.shape) == logical.shape and same_dtype:
            fitting[key] = target
    return fitting


def _allocate(logical: Logical, box: Box) -> tuple[Any, memoryview, Any]:
    entry = box_entry(logical, box)
    adapter = adapter_named(entry.framework)
    try:
        array = adapter.allocate(entry)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CorruptCheckpointError(f"tensor {entry.path}: {exc}") from None
    return array, adapter.writable_bytes(array), entry


def _read_whole(regions: RegionReader, logical: Logical, device: str | None) -> Any:
    box = Box((0,) * len(logical.shape), logical.shape)
    array, view, entry = _allocate(logical, box)
    read_box(regions, logical, box, view)
    return adapter_named(entry.framework).finalize(array, entry, device)


def _read_into_layout(regions: RegionReader, logical: Logical, target: Any) -> Any:
    """This rank's box of ``logical``, as a DTensor laid out like ``target``."""
    from statevault.adapters.torch_dtensor import local_box
    from statevault.distributed.dtensor import wrap_local

    if logical.entry.framework != "torch":
        raise CheckpointError(
            f"tensor {logical.entry.path}: saved as {logical.entry.framework} arrays, "
            "cannot be restored into a DTensor"
        )
    box = local_box(target)
    array, view, entry = _allocate(logical, box)
    read_box(regions, logical, box, view)
    local = adapter_named("torch").finalize(array, entry, None)
    return wrap_local(local.detach(), target)


def _read_plain(
    checkpoint: OpenCheckpoint,
    verify: bool,
    device: str | None,
    ids: list[int] | None = None,
    all_files: bool = False,
) -> dict[int, Any]:
    """The arrays ``ids`` (default: all), verified; a partial load checks only their files
    unless ``all_files`` (a whole load checks every file it may touch)."""
    reader = checkpoint.reader
    where = checkpoint.directory
    entries = checkpoint.manifest.tensors
    wanted = [i for i in ids if 0 <= i < len(entries)] if ids is not None else range(len(entries))
    files = {entries[i].file for i in wanted}
    problems = reader.file_problems(verify, None if ids is None or all_files else files)
    if problems:
        raise CorruptCheckpointError(f"{where} is damaged: {problems[0]}", problems)
    for entry in (entries[i] for i in wanted):  # unknown frameworks fail before any read
        try:
            adapter_named(entry.framework)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: tensor {entry.path}: {exc}") from None
    if checkpoint.location.local:  # view the page cache in place: no allocation, no copy
        outcome = reader.map(wanted, _adopter(where), verify)
    else:
        outcome = reader.read(wanted, _allocator(where), verify)
    if outcome.problems:
        detail = outcome.problems[0] + (
            f" (and {len(outcome.problems) - 1} more)" if len(outcome.problems) > 1 else ""
        )
        raise CorruptCheckpointError(f"{where} is damaged: {detail}", outcome.problems)
    return {
        i: adapter_named(entries[i].framework).finalize(outcome.arrays[i], entries[i], device)
        for i in wanted
    }


def _adopter(where: str) -> Any:
    def adopt(entry: TensorEntry, view: memoryview) -> object:
        try:
            return adapter_named(entry.framework).from_buffer(view, entry)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise CorruptCheckpointError(f"{where}: tensor {entry.path}: {exc}") from None

    return adopt


def _allocator(where: str) -> Any:
    def allocate(entry: TensorEntry) -> tuple[object, memoryview]:
        adapter = adapter_named(entry.framework)
        try:
            array = adapter.allocate(entry)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise CorruptCheckpointError(f"{where}: tensor {entry.path}: {exc}") from None
        return array, adapter.writable_bytes(array)

    return allocate


def decode(
    checkpoint: OpenCheckpoint,
    arrays: Mapping[int, Any],
    node: Any = WHOLE_TREE,
    sharded: Mapping[int, Any] | None = None,
    pick_rank: Any = None,
) -> Any:
    """Decode ``node`` (default: the whole tree), its tensors taken from ``arrays`` and
    ``sharded``; ``pick_rank`` chooses per-rank branches (default: check all, give rank 0's)."""

    def resolver(values: Mapping[int, Any], kind: str) -> Any:
        def resolve(index: int) -> Any:
            if index not in values:
                raise CorruptCheckpointError(
                    f"{checkpoint.directory}: tree refers to {kind} {index}"
                )
            return values[index]

        return resolve

    tree = checkpoint.manifest.tree if node is WHOLE_TREE else node
    return tree_codec.decode(
        tree,
        resolver(arrays, "tensor"),
        checkpoint.directory,
        resolve_sharded=resolver(sharded if sharded is not None else {}, "sharded tensor"),
        pick_rank=pick_rank,
        ranks=checkpoint.manifest.ranks,
    )
