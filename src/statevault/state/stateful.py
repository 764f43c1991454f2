"""The Stateful protocol: anything with ``state_dict()`` and ``load_state_dict()``.

nn.Module, optimizers, LR schedulers, GradScaler, torchdata's StatefulDataLoader and user classes
all qualify. Example::

    class Counter:
        def __init__(self) -> None:
            self.n = 0
        def state_dict(self) -> dict[str, int]:
            return {"n": self.n}
        def load_state_dict(self, state: dict[str, int]) -> None:
            self.n = state["n"]
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


def is_stateful(value: object) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


# Framework objects that are Stateful without the methods (a Keras model, a tf.Module): the
# framework module that must already be imported -> the module whose ``stateful_view(value)``
# returns a Stateful view of ``value``, or None. Nothing is imported before the framework is.
_VIEWS = {"tensorflow": "statevault.integrations.tf_state"}


def as_stateful(value: object) -> Stateful | None:
    """``value`` itself when it is Stateful, else a Stateful view of a framework object that
    is saved as its state (see ``_VIEWS``), else None."""
    if is_stateful(value):
        return value  # type: ignore[return-value]
    for framework, module_name in _VIEWS.items():
        if framework in sys.modules:
            view: Stateful | None = importlib.import_module(module_name).stateful_view(value)
            if view is not None:
                return view
    return None


def type_name(value: object) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def restorable_state(stateful: Stateful, saved: Any) -> Any:
    """What restoring ``stateful`` from ``saved`` sets, as its ``state_dict()`` shows it: the
    target of the fit check of ``load(into=)``. A Stateful with optional parts (RNGState: the
    streams of frameworks) narrows it with a ``restorable_state(saved)`` method; for any other
    it is the whole ``state_dict()``."""
    narrowed = getattr(stateful, "restorable_state", None)
    return narrowed(saved) if callable(narrowed) else stateful.state_dict()
