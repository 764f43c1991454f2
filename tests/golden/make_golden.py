"""Regenerate the golden checkpoint of format version 1: ``python tests/golden/make_golden.py``.

The state is built without any random number generator, from small integers scaled by powers of
two, so every value is exact in every dtype used and the recipe gives the same bytes on every
machine and torch version. tests/test_golden.py recomputes it and checks that

(a) loading the committed checkpoint gives exactly this state,
(b) saving this state today gives byte-identical shards and the same manifest body (apart from
    the volatile ``info`` fields),
(c) the shards open with the stock ``safetensors`` library.

Regenerate ONLY for a deliberate format change (and bump ``format_version`` when old readers
cannot read the new files); a format version that has been released keeps its golden directory
(copy v1/ to v2/ and point this script at the new one rather than rewriting v1).
"""

from __future__ import annotations

import math
import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import statevault as sv

GOLDEN_DIR = Path(__file__).resolve().parent / "v1" / "ckpt"


def _grid(n: int, scale: float, offset: int = 0) -> torch.Tensor:
    """(0..n-1 - offset) * scale in float32: exact for small n and power-of-two scales."""
    return (torch.arange(n, dtype=torch.float32) - offset) * scale


def _module() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    with torch.no_grad():
        for i, parameter in enumerate(model.parameters()):
            parameter.copy_(_grid(parameter.numel(), 0.125, 3 * i).reshape(parameter.shape))
    return model


def golden_state() -> dict[str, Any]:
    """The deterministic state frozen by the golden checkpoint (a fresh copy on every call)."""
    f32 = _grid(12, 0.125, 5).reshape(3, 4)
    tied = _grid(5, 0.5)
    linear = torch.nn.Linear(2, 2)
    with torch.no_grad():
        linear.weight.copy_(_grid(4, 0.25).reshape(2, 2))
        linear.bias.copy_(_grid(2, -1.0))
    return {
        "tensors": {
            "f32": f32,
            "f16": _grid(6, 0.25, 3).to(torch.float16),
            "bf16": _grid(8, 0.5, 4).reshape(2, 4).to(torch.bfloat16),
            "f8_e4m3fn": _grid(16, 0.25, 8).to(torch.float8_e4m3fn),
            "f8_e5m2": _grid(4, 2.0, 1).to(torch.float8_e5m2),
            "f8_e8m0fnu": torch.tensor([0.25, 1.0, 2.0, 64.0]).to(torch.float8_e8m0fnu),
            "c64": torch.complex(_grid(3, 0.5), _grid(3, -0.25, 1)),
            "f64_0d": torch.tensor(3.25, dtype=torch.float64),
            "i64": torch.arange(-3, 5, dtype=torch.int64),
            "i32": torch.tensor([[-(2**31), 2**31 - 1]], dtype=torch.int32),
            "u8": torch.arange(250, 256, dtype=torch.int64).to(torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "empty": torch.empty(0, 3),
            "transposed": f32.t(),
            "param": torch.nn.Parameter(_grid(3, 0.5, 1)),
            "frozen": torch.nn.Parameter(_grid(2, 1.0), requires_grad=False),
        },
        "numpy": {
            "f64": np.arange(6, dtype=np.float64).reshape(2, 3) / 4,
            "i16": np.array([-(2**15), 0, 2**15 - 1], dtype=np.int16),
            "bool": np.array([[True], [False]]),
            "c128": np.array([1 + 2j, -0.5 - 0.25j], dtype=np.complex128),
            "scalars": [np.float32(1.5), np.int64(-7), np.bool_(True), np.uint8(255)],
        },
        "tied_a": tied,
        "nested": {"tied_b": tied, "list": [tied[:2].clone(), torch.zeros(2, dtype=torch.int8)]},
        "model": _module(),  # a Stateful: saved through its state_dict
        "linear_sd": linear.state_dict(),  # an OrderedDict carrying torch's _metadata
        "plain": {
            "int": 7,
            "big_int": 2**53 + 1,
            "min_i64": -(2**63),
            "float": 0.1,
            "neg_zero": -0.0,
            "nan": math.nan,
            "inf": math.inf,
            "neg_inf": -math.inf,
            "true": True,
            "false": False,
            "none": None,
            "str": "h\u00e9llo \u2713 \u65e5\u672c / 0",
            "bytes": b"\x00\xffraw\n",
            "complex": complex(1.5, -2.0),
            "tuple": (1, "a", (2.5, None)),
            "empty_tuple": (),
            "list": [1, [2, [3]], []],
            "empty_dict": {},
            "int_keys": {0: "zero", 1: "one", -3: "minus three"},
            "mixed_keys": {1: "int", "1": "str", (1, 2): "tuple", b"k": "bytes", None: "none"},
            "odict": OrderedDict([("b", 2), ("a", 1)]),
        },
        "step": 100,
    }


def golden_metadata() -> dict[str, Any]:
    return {
        "run": "golden",
        "step": 100,
        "metrics": {"loss": 0.25, "acc": None, "best": math.inf},
        "tags": ("a", "b"),
        "epochs": [1, 2, 3],
    }


def main() -> None:
    if GOLDEN_DIR.exists():
        shutil.rmtree(GOLDEN_DIR)
    manifest = sv.save(golden_state(), GOLDEN_DIR, metadata=golden_metadata())
    files = ", ".join(f"{f.name} ({f.size} B)" for f in manifest.files)
    print(f"wrote {GOLDEN_DIR}: {len(manifest.tensors)} tensors in {files}", file=sys.stderr)


if __name__ == "__main__":
    main()
