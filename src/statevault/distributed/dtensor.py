"""Loads into DTensors (the layout of FSDP2, tensor parallelism and DeviceMesh): this rank's box
of a tensor, read in place, becomes a DTensor laid out like the target (:func:`wrap_local`).
Describing a DTensor for a save is the torch adapter's (adapters/torch_dtensor.py).
"""

from __future__ import annotations

from typing import Any

import torch

from statevault.adapters.torch_dtensor import dtensor_class


def wrap_local(local: torch.Tensor, like: Any) -> Any:
    """A DTensor laid out like ``like`` whose local piece is ``local``."""
    device = like.to_local().device
    kind = dtensor_class()
    return kind.from_local(
        local.to(device),
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )
