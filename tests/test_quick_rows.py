"""The fast path of tensor-row validation accepts exactly what the full validator accepts.

``format.quick_rows.tensor_entry_or_none`` runs on every row of every load; the step-by-step
rule (``Validator.tensor_checked``) names problems. Rows are generated valid, then damaged
field by field (wrong types, out-of-range numbers, unknown dtypes, bad checksums, attrs and
block lists that do not fit); for each, the fast path must give the same entry as the full
rule, or None exactly where the full rule raises.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from statevault.errors import CorruptCheckpointError
from statevault.format import dtypes
from statevault.format.manifest import BLOCK_BYTES, FileEntry, TensorEntry
from statevault.format.quick_rows import tensor_entry_or_none
from statevault.format.validator import Validator

FILES = {
    "a.safetensors": FileEntry("a.safetensors", 64 << 20, 64, "crc32c:00000000"),
    "b.safetensors": FileEntry("b.safetensors", 4096, 128, "crc32c:00000000"),
}
CHECKSUMS = st.integers(0, 2**32 - 1).map(lambda v: f"crc32c:{v:08x}")
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    CHECKSUMS,
    st.sampled_from(["float32", "bfloat16", "bool", "int64", "crc32c:0000000g", "CRC32C:00000000"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = [
    "path",
    "framework",
    "dtype",
    "shape",
    "file",
    "offset",
    "nbytes",
    "checksum",
    "attrs",
    "blocks",
    "hash",
]
HASHES = st.text("0123456789abcdef", min_size=32, max_size=32).map(lambda d: f"xxh3_128:{d}")


@st.composite
def valid_rows(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from(sorted(dtypes.DTYPES)))
    itemsize = dtypes.DTYPES[name].itemsize
    file = draw(st.sampled_from(sorted(FILES)))
    shape = draw(st.lists(st.integers(0, 64), max_size=3))
    nbytes = math.prod(shape) * itemsize
    entry = FILES[file]
    room = entry.size - entry.header_size - nbytes
    if room < 0:
        shape, nbytes, room = [], itemsize, entry.size - entry.header_size - itemsize
    row: dict[str, Any] = {
        "path": draw(st.text(max_size=12)),
        "framework": draw(st.sampled_from(["torch", "numpy", "tensorflow"])),
        "dtype": name,
        "shape": shape,
        "file": file,
        "offset": entry.header_size + draw(st.integers(0, room)),
        "nbytes": nbytes,
        "checksum": draw(CHECKSUMS),
    }
    if draw(st.booleans()):
        grad = name.startswith(("float", "bfloat", "complex")) and draw(st.booleans())
        row["attrs"] = {"parameter": draw(st.booleans()), "requires_grad": grad}
    if nbytes > BLOCK_BYTES or draw(st.booleans()):
        count = max(1, -(-nbytes // BLOCK_BYTES)) - 1
        row["blocks"] = draw(st.lists(CHECKSUMS, min_size=count, max_size=count))
    if draw(st.booleans()):  # incremental saves give rows a content hash
        row["hash"] = draw(HASHES)
    return row


def big_rows() -> st.SearchStrategy[dict[str, Any]]:
    """Rows of several blocks: the block list must have exactly one checksum per boundary."""
    return st.integers(1, 40).flatmap(
        lambda mib: st.builds(
            lambda count: {
                "path": "w",
                "framework": "torch",
                "dtype": "uint8",
                "shape": [mib << 20],
                "file": "a.safetensors",
                "offset": 64,
                "nbytes": mib << 20,
                "checksum": "crc32c:00000001",
                "blocks": ["crc32c:00000002"] * count,
            },
            st.sampled_from([mib - 1, mib, max(0, mib - 2), 0]),
        )
    )


def _itemsize(row: dict[str, Any]) -> int:
    name = row.get("dtype")
    return dtypes.DTYPES[name].itemsize if type(name) is str and name in dtypes.DTYPES else 1


def _damage(draw: st.DrawFn, row: dict[str, Any]) -> None:
    """One damage, aimed at one rule of the validator."""
    action = draw(
        st.sampled_from(
            [
                "replace",
                "delete",
                "nudge",
                "attrs",
                "hash",
                "shape",
                "reshape",
                "long",
                "start",
                "end",
            ]
        )
    )
    key = draw(st.sampled_from(FIELDS))
    if action == "replace":
        row[key] = draw(JSON_VALUES)
    elif action == "delete":
        row.pop(key, None)
    elif action == "nudge" and type(row.get(key)) is int:
        row[key] += draw(st.sampled_from([-1, 1, -(2**40), 2**63]))
    elif action == "hash":  # a content hash of the wrong form or type
        row["hash"] = draw(st.one_of(JSON_SCALARS, HASHES.map(lambda h: h.upper()), HASHES))
    elif action == "attrs":  # bools or not, requires_grad on any dtype
        values = st.one_of(st.booleans(), JSON_SCALARS)
        keys = st.sampled_from(["parameter", "requires_grad", "device"])
        row["attrs"] = draw(st.dictionaries(keys, values, max_size=3))
    elif action == "shape":
        row["shape"] = draw(st.lists(st.one_of(st.integers(-2, 2**62), JSON_SCALARS), max_size=66))
    elif action in ("reshape", "long"):  # a new shape, nbytes kept consistent with it
        huge = st.integers(2**20, 2**62)
        dims = st.integers(0, 2) if action == "long" else st.one_of(st.integers(0, 2), huge)
        row["shape"] = draw(st.lists(dims, min_size=60 if action == "long" else 0, max_size=70))
        row["nbytes"] = math.prod(row["shape"]) * _itemsize(row)
        row["blocks"] = []
    elif action in ("start", "end") and type(row.get("file")) is str and row["file"] in FILES:
        file, nudge = FILES[row["file"]], draw(st.sampled_from([-1, 0, 1]))
        if action == "start":
            row["offset"] = file.header_size + nudge
        elif type(row.get("nbytes")) is int:
            row["offset"] = file.size - row["nbytes"] + nudge


@st.composite
def damaged(draw: st.DrawFn, rows: st.SearchStrategy[dict[str, Any]]) -> Any:
    row = dict(draw(rows))
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        _damage(draw, row)
    return draw(st.one_of(st.just(row), JSON_VALUES)) if draw(st.integers(0, 20)) == 0 else row


def full_rule(row: Any) -> TensorEntry | None:
    try:
        return Validator("ckpt").tensor_checked(row, 0, FILES)
    except CorruptCheckpointError:
        return None


@settings(max_examples=1500, deadline=None)
@given(damaged(valid_rows()))
def test_fast_path_agrees_with_the_full_rule(row: Any) -> None:
    assert tensor_entry_or_none(row, FILES, BLOCK_BYTES) == full_rule(row)


@settings(max_examples=200, deadline=None)
@given(damaged(big_rows()))
def test_fast_path_agrees_on_block_lists(row: Any) -> None:
    assert tensor_entry_or_none(row, FILES, BLOCK_BYTES) == full_rule(row)


@settings(max_examples=200, deadline=None)
@given(valid_rows())
def test_valid_rows_take_the_fast_path(row: dict[str, Any]) -> None:
    entry = tensor_entry_or_none(row, FILES, BLOCK_BYTES)
    assert entry is not None
    assert entry == full_rule(row)


def test_a_rejected_row_is_named_by_the_full_rule() -> None:
    row = {
        "path": "w",
        "framework": "torch",
        "dtype": "float32",
        "shape": [2],
        "file": "a.safetensors",
        "offset": 64,
        "nbytes": 9,
        "checksum": "crc32c:00000000",
    }
    assert tensor_entry_or_none(row, FILES, BLOCK_BYTES) is None
    try:
        Validator("ckpt").tensor(row, 3, FILES)
    except CorruptCheckpointError as exc:
        assert "tensors[3] (w): 9 bytes do not match dtype float32" in str(exc)
    else:
        raise AssertionError("an inconsistent row was accepted")
