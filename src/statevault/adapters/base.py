"""The adapter protocol: how the engine sees a framework's arrays, without importing it.

One module per framework implements the same functions (the safetensors habit). Save path::

    adapter.describe(obj, path)          -> ArraySpec (dtype name, shape, attrs)
    adapter.identity(obj)                -> a key equal for the same tensor (ties), or None
    adapter.stage(objs)                  -> C-contiguous little-endian bytes of each, viewed in
                                            place on the host where possible (a blocked caller)
    adapter.stage_into(objs, arena)      -> the same, copied into reusable staging memory
    adapter.prepare_staging(objs, arena) -> ready the arena for these objects (pinning)

Load path::

    buffer = adapter.allocate(entry)     -> a host array of the entry's dtype and shape
    adapter.writable_bytes(buffer)       -> a memoryview the reader fills
    adapter.from_buffer(view, entry)     -> an array over bytes already in memory (a mapped file)
    adapter.finalize(buffer, entry, device) -> the object the user gets back
    adapter.mismatch(target, loaded) / adapter.copy_into(target, loaded)   for ``into=``
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from statevault.format.manifest import TensorEntry
from statevault.format.rules import ShardRule


class Staging(Protocol):
    """Reusable host memory that staged copies go into (the engine's StagingArena): adapters
    take from it and may register its chunks with their framework (pinning for CUDA copies)."""

    def take(self, nbytes: int) -> memoryview: ...

    def add_registration(
        self,
        register: Callable[[memoryview], None],
        unregister: Callable[[memoryview], None],
    ) -> None: ...


@dataclass(frozen=True)
class ShardInfo:
    """Where a leaf that is one rank's piece of a sharded tensor lies in the whole tensor."""

    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    # (this rank's coordinate, mesh size) on every mesh dimension the tensor is replicated over:
    # ranks differing only there hold the same chunk, and only one of them stores it.
    replicas: tuple[tuple[int, int], ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)  # of the whole tensor (Parameter-ness)
    # The layout as a rule (format/rules.py; replicate placements at coordinate 0, the saver
    # picks the writer), when the sharding is regular enough to have one; else None.
    rule: ShardRule | None = None


@dataclass(frozen=True)
class ArraySpec:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    attrs: dict[str, Any] = field(default_factory=dict)


class ArrayAdapter(Protocol):
    framework: str

    def recognizes(self, obj: object) -> bool: ...

    def describe(self, obj: Any, path: str) -> ArraySpec: ...

    def identity(self, obj: Any) -> Hashable | None: ...

    def stage(self, objs: Sequence[Any]) -> list[memoryview]: ...

    def stage_into(self, objs: Sequence[Any], arena: Staging) -> list[memoryview]: ...

    def prepare_staging(self, objs: Sequence[Any], arena: Staging) -> None: ...

    def allocate(self, entry: TensorEntry) -> Any: ...

    def writable_bytes(self, array: Any) -> memoryview: ...

    def from_buffer(self, view: memoryview, entry: TensorEntry) -> Any: ...

    def finalize(self, array: Any, entry: TensorEntry, device: str | None) -> Any: ...

    def mismatch(self, target: Any, loaded: Any) -> str | None: ...

    def copy_into(self, target: Any, loaded: Any) -> None: ...

    def host_copy_bytes(self, target: Any, loaded: Any) -> int:
        """The bytes ``copy_into(target, loaded)`` moves when it is a plain host memcpy that
        releases the GIL and touches nothing else (so it may run on any thread, beside other
        such copies); 0 when it is anything else (a device copy, a collective, a cast)."""
        ...
