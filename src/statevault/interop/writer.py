"""Stream arrays of a checkpoint into one safetensors file with bounded memory.

The header is written first (every name, dtype and shape is known from the manifest), then
each array's bytes in C order, slab by slab: a *slab* is a box of the array whose bytes are
contiguous in C order (a range along one dimension, every later dimension whole, single indices
before it), at most ``buffer_bytes`` large where the shape allows. Each slab is filled from the
stored chunks by a verified ranged read (:func:`statevault.engine.reshard.read_box`), so a
plain tensor and a sharded one (consolidated from its chunks) take the same path, and memory
stays at about one slab plus the reads' block widening, whatever the size of the tensors.

The file is written under a temporary name beside the target, fsynced and renamed: a reader
never sees a half-written export.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from statevault.engine.regions import RegionReader
from statevault.engine.reshard import Logical, read_box
from statevault.format import dtypes
from statevault.format.geometry import Box
from statevault.format.safetensors_io import HeaderEntry, encode_header
from statevault.interop import casting
from statevault.interop.progress import ByteProgress

DEFAULT_BUFFER_BYTES = 16 << 20  # a multiple of the checksum block (BLOCK_BYTES): exact reads


@dataclass(frozen=True)
class Item:
    """One array to write: its name in the file, where its bytes come from, the dtype written."""

    name: str
    logical: Logical
    dtype: str  # output dtype (the stored one unless converted)

    @property
    def nbytes(self) -> int:
        return math.prod(self.logical.shape) * dtypes.lookup(self.dtype).itemsize


def header_bytes(items: Sequence[Item], metadata: dict[str, str]) -> bytes:
    entries = []
    begin = 0
    for item in items:
        code = dtypes.lookup(item.dtype).safetensors
        assert code is not None, item.dtype  # checked by the export plan
        entries.append(HeaderEntry(item.name, code, item.logical.shape, begin, begin + item.nbytes))
        begin += item.nbytes
    return encode_header(entries, metadata)


def write_file(
    target: str,
    items: Sequence[Item],
    regions: RegionReader,
    metadata: dict[str, str],
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    progress: ByteProgress | None = None,
) -> int:
    """Write ``items`` as the safetensors file ``target`` (temp name, fsync, rename); returns
    its size. ``target``'s directory must exist. ``progress.advance`` is called with the bytes
    of each slab written (the caller has called ``start``)."""
    temporary = f"{target}.tmp-{uuid.uuid4().hex[:12]}"
    advance = progress.advance if progress is not None else _ignore
    try:
        with open(temporary, "xb") as out:
            out.write(header_bytes(items, metadata))
            buffer = bytearray(buffer_bytes)
            for item in items:
                _write_item(out, item, regions, buffer, advance)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return size


def _write_item(
    out: BinaryIO,
    item: Item,
    regions: RegionReader,
    buffer: bytearray,
    advance: Callable[[int], None],
) -> None:
    logical = item.logical
    source = logical.entry.dtype
    for box in slabs(logical.shape, logical.itemsize, len(buffer)):
        size = box.numel * logical.itemsize
        view = memoryview(buffer)[:size] if size <= len(buffer) else memoryview(bytearray(size))
        read_box(regions, logical, box, view)
        data = casting.convert(view, source, item.dtype)
        out.write(data)
        if data.nbytes:
            advance(data.nbytes)


def _ignore(amount: int) -> None:
    pass


def slabs(shape: tuple[int, ...], itemsize: int, limit: int) -> Iterator[Box]:
    """Boxes covering ``shape`` in C order, each contiguous and at most ``limit`` bytes where a
    single element row allows (a box is never smaller than one element)."""
    if not shape:
        yield Box((), ())
        return
    if math.prod(shape) == 0:
        return
    dim = next(
        (d for d in range(len(shape)) if math.prod(shape[d + 1 :]) * itemsize <= limit),
        len(shape) - 1,
    )
    inner = math.prod(shape[dim + 1 :]) * itemsize
    step = max(1, limit // inner)
    for prefix in itertools.product(*(range(n) for n in shape[:dim])):
        for start in range(0, shape[dim], step):
            count = min(step, shape[dim] - start)
            yield Box(
                (*prefix, start, *(0,) * (len(shape) - dim - 1)),
                (*(1,) * dim, count, *shape[dim + 1 :]),
            )
