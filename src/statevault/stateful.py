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

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


def is_stateful(value: object) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


def type_name(value: object) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"
