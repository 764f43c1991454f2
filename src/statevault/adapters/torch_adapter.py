"""PyTorch tensors and Parameters, on any device.

Staging copies device tensors into page-locked (pinned) host buffers with non-blocking copies and
one synchronization at the end, so the device-to-host transfers overlap; CPU tensors are viewed in
place for a synchronous save and copied for an asynchronous one (training will mutate them).
Loading fills fresh CPU tensors, then moves them to ``device`` (through pinned memory for CUDA).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

from statevault.adapters.base import ArraySpec, Staging
from statevault.adapters.memory import fresh_host_memory
from statevault.errors import UnsupportedValueError
from statevault.format import dtypes
from statevault.format.manifest import TensorEntry

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


class TorchAdapter:
    framework = "torch"

    def recognizes(self, obj: object) -> bool:
        return isinstance(obj, torch.Tensor)

    def describe(self, obj: Any, path: str) -> ArraySpec:
        tensor: torch.Tensor = obj
        _check_supported(tensor, path)
        name = str(tensor.dtype).removeprefix("torch.")
        shape = tuple(int(d) for d in tensor.shape)
        attrs: dict[str, Any] = {"device": str(tensor.device)}
        if type(tensor) is torch.nn.Parameter:
            attrs["parameter"] = True
        if tensor.requires_grad:
            attrs["requires_grad"] = True
        return ArraySpec(name, shape, math.prod(shape) * dtypes.lookup(name).itemsize, attrs)

    def local_shard(self, obj: Any, path: str) -> tuple[torch.Tensor, Any] | None:
        """This rank's piece of a DTensor and where it lies (a ShardInfo); None for others."""
        from statevault.adapters.torch_dtensor import describe_dtensor, is_dtensor

        if not is_dtensor(obj):
            return None
        return describe_dtensor(obj, path)

    def identity(self, obj: Any) -> Hashable | None:
        tensor: torch.Tensor = obj
        if tensor.numel() == 0:
            return None  # empty tensors share the null pointer without being tied
        return (
            "torch",
            str(tensor.device),
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
            tensor.is_conj(),
            tensor.is_neg(),
            type(tensor) is torch.nn.Parameter,  # a Parameter and a plain alias come back apart
            tensor.requires_grad,
        )

    def stage(self, objs: Sequence[Any]) -> list[memoryview]:
        staged = [_stage_one(t.detach()) for t in objs]
        if any(t.device.type == "cuda" for t in objs):
            torch.cuda.synchronize()
        return [_memoryview(t) for t in staged]

    def stage_into(self, objs: Sequence[Any], arena: Staging) -> list[memoryview]:
        """Copy into arena slices: CUDA tensors with non-blocking copies on a side stream into
        pinned (registered) arena memory and one synchronization; CPU tensors by memcpy."""
        cuda = [t for t in objs if t.device.type == "cuda"]
        if cuda:
            _pin_arena(arena)
        stream = _side_stream() if cuda else None
        views: list[memoryview] = []
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for tensor in objs:
                view = arena.take(tensor.numel() * tensor.element_size())
                views.append(view)
                if len(view) == 0:
                    continue
                _copy_to_host(tensor.detach(), view)
        if stream is not None:
            stream.synchronize()
        return views

    def prepare_staging(self, objs: Sequence[Any], arena: Staging) -> None:
        """Before a prewarm: CUDA state needs the arena page-locked (done as chunks are made)."""
        if any(t.device.type == "cuda" for t in objs):
            _pin_arena(arena)

    def allocate(self, entry: TensorEntry) -> torch.Tensor:
        dtype = torch_dtype(entry.dtype)
        memory = fresh_host_memory(entry.nbytes)
        if memory is None:
            return torch.empty(entry.shape, dtype=dtype)
        # The tensor keeps the mapping alive; it is freed with the tensor.
        flat = torch.frombuffer(memory, dtype=torch.uint8, count=entry.nbytes)
        return flat.view(dtype).view(entry.shape)

    def from_buffer(self, view: memoryview, entry: TensorEntry) -> torch.Tensor:
        """A tensor over ``view`` (no copy); it keeps the underlying mapping alive."""
        dtype = torch_dtype(entry.dtype)
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        # frombuffer in the tensor's own dtype: one view fewer (this runs once per tensor).
        return torch.frombuffer(view, dtype=dtype).view(entry.shape)

    def writable_bytes(self, array: Any) -> memoryview:
        return _memoryview(array)

    def finalize(self, array: Any, entry: TensorEntry, device: str | None) -> Any:
        tensor: torch.Tensor = array
        if device is not None and torch.device(device).type != "cpu":
            tensor = tensor.pin_memory().to(device, non_blocking=False)
        if entry.attrs.get("parameter") is True:
            return torch.nn.Parameter(
                tensor, requires_grad=entry.attrs.get("requires_grad") is True
            )
        if entry.attrs.get("requires_grad") is True and tensor.is_floating_point():
            tensor.requires_grad_(True)
        return tensor

    def mismatch(self, target: Any, loaded: Any) -> str | None:
        if not isinstance(loaded, torch.Tensor):
            return f"the checkpoint holds a {type(loaded).__name__} where the target has a tensor"
        if target.shape != loaded.shape or target.dtype != loaded.dtype:
            return (
                f"{list(loaded.shape)} {loaded.dtype} in the checkpoint, "
                f"{list(target.shape)} {target.dtype} in the target"
            )
        return None

    def copy_into(self, target: Any, loaded: Any) -> None:
        from statevault.adapters.torch_dtensor import is_dtensor

        if is_dtensor(target):  # the load read this rank's piece in the target's layout
            with torch.no_grad():
                local = loaded.to_local() if is_dtensor(loaded) else None
                if local is not None and loaded.placements == target.placements:
                    target.to_local().copy_(local)
                else:
                    target.copy_(loaded)
            return
        if _host_memcpy(target, loaded):
            if target.numel():  # one GIL-free memcpy, as in staging (see _copy_to_host)
                _copy_to_host(loaded.detach(), _memoryview(target.detach()))
            return
        with torch.no_grad():
            target.copy_(loaded)

    def host_copy_bytes(self, target: Any, loaded: Any) -> int:
        from statevault.adapters.torch_dtensor import is_dtensor

        if is_dtensor(target) or is_dtensor(loaded) or not _host_memcpy(target, loaded):
            return 0
        return int(target.numel() * target.element_size())


def _host_memcpy(target: torch.Tensor, loaded: torch.Tensor) -> bool:
    """Whether copying ``loaded`` into ``target`` is one plain memcpy between host buffers."""
    return (
        target.dtype == loaded.dtype
        and target.shape == loaded.shape
        and target.device.type == "cpu"
        and loaded.device.type == "cpu"
        and target.is_contiguous()
        and loaded.is_contiguous()
        and not loaded.is_conj()
        and not loaded.is_neg()
    )


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"this torch has no dtype {name}")
    return dtype


def _copy_to_host(tensor: torch.Tensor, view: memoryview) -> None:
    """Copy a tensor's values into staging bytes.

    A plain CPU tensor is copied by one single-threaded memcpy that releases the GIL (numpy's
    copyto of byte views): torch's ``copy_`` goes through its OpenMP pool, and each of a state's
    hundreds of calls then waits for every core, which the dataloader workers keep busy (measured:
    up to 8x the memcpy time on a loaded 2-core machine). Device tensors, views with gaps and
    conjugate / negative views take ``copy_``, non-blocking on the caller's (side) stream.
    """
    plain = tensor.device.type == "cpu" and tensor.is_contiguous()
    if plain and not tensor.is_conj() and not tensor.is_neg():
        source: Any = _bytes_of(tensor).numpy()
        np.copyto(np.frombuffer(view, dtype=np.uint8), source)
        return
    target = torch.frombuffer(view, dtype=torch.uint8).view(tensor.dtype).view(tensor.shape)
    with torch.no_grad():
        target.copy_(tensor, non_blocking=tensor.is_cuda)


def _side_stream() -> Any:
    """A copy stream that first waits for the work already queued on the current stream."""
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    return stream


def _pin_arena(arena: Staging) -> None:
    """Page-lock every arena chunk once (cudaHostRegister), and chunks added later too."""
    arena.add_registration(_register_chunk, _unregister_chunk)


def _register_chunk(view: memoryview) -> None:
    array: Any = np.frombuffer(view, dtype=np.uint8)
    runtime = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    error = runtime.cudaHostRegister(array.ctypes.data, len(view), 0)
    if int(error) != 0:
        raise RuntimeError(
            f"cudaHostRegister of {len(view)} bytes of staging memory failed ({error})"
        )


def _unregister_chunk(view: memoryview) -> None:
    """Unpin a chunk before its memory is unmapped (the address may be reused later)."""
    array: Any = np.frombuffer(view, dtype=np.uint8)
    torch.cuda.cudart().cudaHostUnregister(array.ctypes.data)  # type: ignore[no-untyped-call]


def _check_supported(tensor: torch.Tensor, path: str) -> None:
    if type(tensor) not in _PLAIN_TYPES:
        raise UnsupportedValueError(
            path,
            f"tensor subclass {type(tensor).__qualname__} is not supported; save a plain "
            "torch.Tensor (for example tensor.full_tensor() or tensor.to_local())",
        )
    if tensor.layout != torch.strided:
        raise UnsupportedValueError(
            path, f"{tensor.layout} tensors are not supported; convert with .to_dense()"
        )
    if tensor.is_quantized or str(tensor.dtype).removeprefix("torch.") not in dtypes.DTYPES:
        raise UnsupportedValueError(
            path, f"dtype {tensor.dtype} is not supported; convert it (e.g. .dequantize())"
        )
    if tensor.device.type == "meta":
        raise UnsupportedValueError(path, "meta tensors hold no data; materialize them first")


def _stage_one(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.resolve_conj().resolve_neg()
    if tensor.device.type != "cpu":
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
        host.copy_(tensor, non_blocking=True)
        return host
    return tensor.contiguous()


def _memoryview(tensor: torch.Tensor) -> memoryview:
    """A writable view of a CPU tensor's bytes (C-contiguous input), sharing its memory."""
    array: Any = _bytes_of(tensor).numpy()
    return memoryview(array)


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor sharing its memory (C-contiguous input)."""
    return tensor.reshape(-1).view(torch.uint8)
