"""DTensor (the layout of FSDP2, tensor parallelism and DeviceMesh) as the torch adapter sees it:
a value whose local piece is an array, and where that piece lies in the whole tensor.

Imported only once torch is: the planner asks the torch adapter for a DTensor's local piece and
where it lies (:func:`describe_dtensor`); a load that restores into DTensors reads each rank's
box (:func:`local_box`) and wraps it back (distributed/dtensor.py).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from statevault.adapters.base import ShardInfo
from statevault.errors import UnsupportedValueError
from statevault.format.geometry import Box
from statevault.format.rules import REPLICATE, SHARD, ShardRule


def dtensor_class() -> Any:
    """The DTensor class when torch.distributed.tensor is imported (else no DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(value: object) -> bool:
    kind = dtensor_class()
    return kind is not None and isinstance(value, kind)


def describe_dtensor(value: Any, path: str) -> tuple[torch.Tensor, ShardInfo]:
    """This rank's piece of ``value`` and where it lies in the whole tensor."""
    if any(placement.is_partial() for placement in value.placements):
        raise UnsupportedValueError(
            path,
            "a DTensor with a Partial placement holds unreduced values; redistribute it to "
            "Shard/Replicate placements (or call .full_tensor()) before saving",
        )
    box = local_box(value)
    mesh = value.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise UnsupportedValueError(path, "this rank is not in the DTensor's device mesh")
    replicas = tuple(
        (int(coordinate[dim]), int(mesh.size(dim)))
        for dim, placement in enumerate(value.placements)
        if placement.is_replicate()
    )
    attrs: dict[str, Any] = {}
    if isinstance(value, torch.nn.Parameter):
        attrs["parameter"] = True
    if value.requires_grad:
        attrs["requires_grad"] = True
    local = value.to_local().detach()
    if tuple(local.shape) != box.sizes:
        raise UnsupportedValueError(
            path,
            f"the DTensor's local tensor has shape {tuple(local.shape)}, its chunk {box.sizes} "
            "(padded local shards are not supported)",
        )
    shape = tuple(int(d) for d in value.shape)
    rule = sharding_rule(value, shape, tuple(int(c) for c in coordinate), box, path)
    return local, ShardInfo(shape, box.offsets, replicas, attrs, rule)


def sharding_rule(
    value: Any, shape: tuple[int, ...], coordinate: tuple[int, ...], box: Box, path: str
) -> ShardRule | None:
    """The DTensor's layout as a rule (format/rules.py), when every placement is a plain
    ``Shard`` or ``Replicate``; None for others (``_StridedShard``: its pieces get rows)."""
    from torch.distributed.tensor import Replicate, Shard

    placements: list[tuple[str, int]] = []
    for placement in value.placements:
        if type(placement) is Shard:
            placements.append((SHARD, int(placement.dim)))
        elif type(placement) is Replicate:
            placements.append((REPLICATE, 0))
        else:
            return None
    mesh = value.device_mesh
    ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
    contiguous = ranks == list(range(ranks[0], ranks[0] + len(ranks)))
    rule = ShardRule(
        tuple(int(d) for d in mesh.mesh.shape),
        tuple(placements),
        ranks[0] if contiguous else 0,
        None if contiguous else tuple(ranks),
    )
    if rule.piece(shape, coordinate) != box:  # never seen: torch and the rule disagree
        raise UnsupportedValueError(
            path,
            f"this rank's piece {box} is not the one its placements {value.placements} give "
            f"({rule.piece(shape, coordinate)}); please report this layout",
        )
    return rule


def local_box(value: Any) -> Box:
    """The box of the whole tensor this rank holds."""
    chunks = value.__create_chunk_list__()
    if len(chunks) != 1:
        raise UnsupportedValueError("", f"a DTensor with {len(chunks)} local chunks")
    chunk = chunks[0]
    return Box(tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes))
