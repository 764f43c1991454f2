"""The manager's arguments, checked where they are given: a mistake is refused at the call with a
message that says what to pass instead, never discovered by a background save or a later scan.

Example::

    step = as_step(np.int64(1200))           # 1200, a python int
    count_or_none("max_to_keep", -1)         # ValueError: None keeps all, or >= 1
"""

from __future__ import annotations

import numbers
from typing import Any

# Checkpoint directories are named with at most 19 digits (``step_{step:09d}``): a larger step
# would be written but never found again by a scan.
MAX_STEP = 10**19 - 1


def as_step(step: Any) -> int:
    """``step`` as a python int: python ints and numpy integers are steps; bools, floats,
    strings and anything else are refused (TypeError), and so are steps out of range."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(
            f"a step is a whole number (int or numpy integer), got {type(step).__name__} "
            f"{step!r}; pass int(step) if it counts steps"
        )
    value = int(step)
    if not 0 <= value <= MAX_STEP:
        raise ValueError(f"steps are between 0 and {MAX_STEP}, got {value}")
    return value


def count(name: str, value: Any) -> int:
    """A count of at least 1 (an int, not a bool or a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def count_or_none(name: str, value: Any, none_means: str = "keep all") -> int | None:
    """None, or a count of at least 1; a negative or zero count is not a synonym of None."""
    if value is None:
        return None
    try:
        return count(name, value)
    except ValueError:
        raise ValueError(
            f"{name} must be None ({none_means}) or >= 1, got {value}; pass {name}=None "
            f"to {none_means}"
        ) from None


def seconds_or_none(name: str, value: Any, allow_zero: bool = False) -> float | None:
    """None, or a positive number of seconds (zero too where ``allow_zero``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__} {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound} seconds, got {value}")
    return float(value)


def seconds(name: str, value: Any, allow_zero: bool = False) -> float:
    checked = seconds_or_none(name, value, allow_zero)
    if checked is None:
        raise TypeError(f"{name} must be a number of seconds, got None")
    return checked


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        options = " or ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be {options}, got {value!r}")
    return str(value)


def text_or_none(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    return value
