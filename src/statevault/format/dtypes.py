"""The dtype table: one row per element type the format stores.

Names are framework-neutral and follow torch's spelling (``bfloat16``, ``float8_e4m3fn``). Each
row says the item size, the code a stock safetensors reader knows (``None`` where safetensors has
none: such tensors are stored as raw ``U8`` bytes and the manifest keeps the true dtype), and the
numpy dtype where numpy has one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int
    safetensors: str | None
    numpy: str | None


_ROWS = [
    DType("bool", 1, "BOOL", "bool"),
    DType("uint8", 1, "U8", "uint8"),
    DType("int8", 1, "I8", "int8"),
    DType("uint16", 2, "U16", "uint16"),
    DType("int16", 2, "I16", "int16"),
    DType("uint32", 4, "U32", "uint32"),
    DType("int32", 4, "I32", "int32"),
    DType("uint64", 8, "U64", "uint64"),
    DType("int64", 8, "I64", "int64"),
    DType("float16", 2, "F16", "float16"),
    DType("bfloat16", 2, "BF16", None),
    DType("float32", 4, "F32", "float32"),
    DType("float64", 8, "F64", "float64"),
    DType("float8_e4m3fn", 1, "F8_E4M3", None),
    DType("float8_e5m2", 1, "F8_E5M2", None),
    DType("float8_e4m3fnuz", 1, "F8_E4M3FNUZ", None),
    DType("float8_e5m2fnuz", 1, "F8_E5M2FNUZ", None),
    DType("float8_e8m0fnu", 1, None, None),
    DType("float4_e2m1fn_x2", 1, None, None),
    DType("complex32", 4, None, None),
    DType("complex64", 8, "C64", "complex64"),
    DType("complex128", 16, None, "complex128"),
]

DTYPES: dict[str, DType] = {row.name: row for row in _ROWS}
_BY_NUMPY: dict[str, DType] = {row.numpy: row for row in _ROWS if row.numpy is not None}


def lookup(name: str) -> DType:
    """The row for a dtype name; KeyError when the format does not know it."""
    return DTYPES[name]


def from_numpy_name(numpy_name: str) -> DType | None:
    """The row for a numpy dtype name (``numpy.dtype.name``), or None."""
    return _BY_NUMPY.get(numpy_name)


def safetensors_code(dtype: DType) -> str:
    """The dtype written into the safetensors header: the native code, or raw bytes."""
    return dtype.safetensors if dtype.safetensors is not None else "U8"
