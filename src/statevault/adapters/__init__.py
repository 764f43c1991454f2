"""Framework adapters, chosen by the type of a value; importing this imports no framework.

A framework's adapter is only loaded once that framework is imported by the user (a torch
tensor cannot exist otherwise), or when a checkpoint holding its arrays is loaded.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from statevault.adapters.base import ArrayAdapter, ArraySpec
from statevault.errors import CheckpointError, UnsupportedFormatError

__all__ = ["ArrayAdapter", "ArraySpec", "adapter_for", "adapter_named", "known_frameworks"]

# framework name -> (module that must already be imported for its values to exist, adapter)
_KNOWN = {
    "numpy": ("numpy", "statevault.adapters.numpy_adapter", "NumpyAdapter", "numpy"),
    "torch": ("torch", "statevault.adapters.torch_adapter", "TorchAdapter", "torch"),
    "tensorflow": (
        "tensorflow",
        "statevault.adapters.tf_adapter",
        "TensorFlowAdapter",
        "tensorflow",
    ),
}
_LOADED: dict[str, ArrayAdapter] = {}


def adapter_named(framework: str) -> ArrayAdapter:
    """The adapter for ``framework`` (importing the framework); CheckpointError if unavailable."""
    if framework in _LOADED:
        return _LOADED[framework]
    if framework not in _KNOWN:
        raise UnsupportedFormatError(
            f"arrays of framework {framework[:40]!r} are not known to this statevault "
            "(written by a newer one, or damaged)"
        )
    _, module_name, class_name, extra = _KNOWN[framework]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(
            f"this checkpoint holds {framework} arrays but {framework} is not installed "
            f"({exc}); install it with: pip install 'statevault[{extra}]'"
        ) from None
    adapter: ArrayAdapter = getattr(module, class_name)()
    _LOADED[framework] = adapter
    return adapter


def known_frameworks() -> frozenset[str]:
    return frozenset(_KNOWN)


def adapter_for(value: Any) -> ArrayAdapter | None:
    """The adapter that recognises ``value`` as an array, or None."""
    for framework, (needed_module, *_rest) in _KNOWN.items():
        if needed_module in sys.modules:
            adapter = adapter_named(framework)
            if adapter.recognizes(value):
                return adapter
    return None
