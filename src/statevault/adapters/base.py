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

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from statevault.engine.arena import StagingArena
from statevault.format.manifest import TensorEntry


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

    def stage_into(self, objs: Sequence[Any], arena: StagingArena) -> list[memoryview]: ...

    def prepare_staging(self, objs: Sequence[Any], arena: StagingArena) -> None: ...

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
