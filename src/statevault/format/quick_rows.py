"""The fast path of manifest validation: a ``tensors`` row checked in one straight pass.

A load validates every row of the manifest before it uses any of them, and a checkpoint of a
transformer holds hundreds to hundreds of thousands of rows, so the per-row cost is paid on
every load. :func:`tensor_entry_or_none` makes exactly the checks of the manifest validator's
tensor rule (``validator.Validator.tensor``) with no error text built along the way, and returns
``None`` on the first failure; the caller then runs the full validator, which names the problem.
The two must accept the same rows: ``tests/test_quick_rows.py`` checks that on generated rows,
valid and damaged, against the validator.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from statevault.format import dtypes
from statevault.format.checksum import CONTENT_HASH_PATTERN

if TYPE_CHECKING:
    from statevault.format.manifest import FileEntry, TensorEntry

_ITEMSIZE = {name: row.itemsize for name, row in dtypes.DTYPES.items()}
_CHECKSUM = re.compile(r"crc32c:[0-9a-f]{8}")  # exactly what format.checksum writes
GRAD_DTYPE_PREFIXES = ("float", "bfloat", "complex")  # the dtypes that can require gradients
_LIMIT = 1 << 63  # no array may be this large (or larger)
_MAX_DIMS = 64


def tensor_entry_or_none(
    row: Any, files: dict[str, FileEntry], block_bytes: int
) -> TensorEntry | None:
    """The entry of a valid ``tensors`` row, or None when any check fails."""
    from statevault.format.manifest import TensorEntry

    if type(row) is not dict:
        return None
    get = row.get
    path, framework, dtype_name = get("path"), get("framework"), get("dtype")
    shape, file_name, checksum = get("shape"), get("file"), get("checksum")
    offset, nbytes = get("offset"), get("nbytes")
    if not (
        type(path) is str
        and type(framework) is str
        and type(dtype_name) is str
        and type(file_name) is str
        and type(checksum) is str
        and type(shape) is list
        and type(offset) is int
        and type(nbytes) is int
    ):
        return None
    itemsize = _ITEMSIZE.get(dtype_name)
    file = files.get(file_name)
    if itemsize is None or file is None or offset < 0 or nbytes < 0 or len(shape) > _MAX_DIMS:
        return None
    size = bound = itemsize
    for dim in shape:
        if type(dim) is not int or dim < 0:
            return None
        size *= dim
        bound *= dim or 1
    if bound >= _LIMIT or size != nbytes or _CHECKSUM.fullmatch(checksum) is None:
        return None
    if offset < file.header_size or offset + nbytes > file.size:
        return None
    attrs = _attrs_or_none(row, dtype_name)
    blocks = _blocks_or_none(row, nbytes, block_bytes)
    if attrs is None or blocks is None:
        return None
    content = get("hash")
    if "hash" in row and (
        type(content) is not str or CONTENT_HASH_PATTERN.fullmatch(content) is None
    ):
        return None
    return TensorEntry(
        path,
        framework,
        dtype_name,
        tuple(shape),
        file_name,
        offset,
        nbytes,
        checksum,
        attrs,
        blocks,
        content,
    )


def _attrs_or_none(row: dict[str, Any], dtype_name: str) -> dict[str, Any] | None:
    if "attrs" not in row:
        return {}
    attrs = row["attrs"]
    if type(attrs) is not dict:
        return None
    if type(attrs.get("parameter", False)) is not bool:
        return None
    requires_grad = attrs.get("requires_grad", False)
    if type(requires_grad) is not bool:
        return None
    if requires_grad and not dtype_name.startswith(GRAD_DTYPE_PREFIXES):
        return None
    return attrs


def _blocks_or_none(row: dict[str, Any], nbytes: int, block_bytes: int) -> tuple[str, ...] | None:
    if "blocks" not in row:
        return ()
    items = row["blocks"]
    if type(items) is not list:
        return None
    match = _CHECKSUM.fullmatch
    for item in items:
        if type(item) is not str or match(item) is None:
            return None
    if items and len(items) != max(1, -(-nbytes // block_bytes)) - 1:
        return None
    return tuple(items)
