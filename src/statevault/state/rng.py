"""RNGState: a Stateful holding every random stream a training step draws from.

Captures python's ``random``, numpy's global RandomState, torch's CPU generator and the generator
of every CUDA device (torch's only when the program has imported torch: statevault never imports
a framework on its own). Save it with the rest of the state; load restores the streams, so that
dropout masks, augmentations and shuffles continue as if the run had never stopped. Example::

    sv.save({"model": model, "rng": sv.RNGState()}, path)
    sv.load(path, into={"model": model, "rng": sv.RNGState()})

A restore sets the streams the checkpoint has and this process can set, and only those:
python's and numpy's always; torch's only if the checkpoint holds them (an RNGState saved by a
program that had not imported torch, a Keras one say, restores into a program that has). A
torch stream saved but not restorable here (torch not imported) is skipped with a warning.
:meth:`RNGState.restorable_state` tells the fit check of ``load(into=)`` exactly that.
"""

from __future__ import annotations

import random
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

# Streams every process has (python, numpy): a checkpoint without them does not fit.
_ALWAYS = ("python", "numpy")
# Streams of a framework: the module that must be imported for them to be restored.
_FRAMEWORK_OF = {"torch_cpu": "torch", "torch_cuda": "torch"}


class RNGState:
    """The program's global random streams as a Stateful (see the module docstring)."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(legacy=True),
        }
        torch = sys.modules.get("torch")
        if torch is not None:
            state["torch_cpu"] = torch.get_rng_state()
            if torch.cuda.is_available():  # always, so that a fresh process has the same keys
                state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def restorable_state(self, saved: Any) -> dict[str, Any]:
        """What a restore from ``saved`` sets, as ``state_dict()`` shows it: python's and
        numpy's streams, and each other stream of this process that ``saved`` holds. A saved
        stream whose framework is not imported here maps to None (no demand on its shape: it
        is skipped with a warning)."""
        current = self.state_dict()
        if not isinstance(saved, Mapping):
            return current  # the fit check reports the saved value's type
        wanted = {k: v for k, v in current.items() if k in _ALWAYS or k in saved}
        for key in saved:
            framework = _FRAMEWORK_OF.get(str(key))
            if key not in current and framework is not None and framework not in sys.modules:
                wanted[key] = None
        return wanted

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(_python_state(state_dict["python"]))
        np.random.set_state(state_dict["numpy"])
        torch = sys.modules.get("torch")
        if "torch_cpu" in state_dict:
            if torch is None:
                warnings.warn(
                    "statevault: torch RNG state saved but torch is not imported", stacklevel=2
                )
                return
            torch.set_rng_state(state_dict["torch_cpu"])
        cuda_states = state_dict.get("torch_cuda")
        if cuda_states and torch is not None:
            self._load_cuda(torch, cuda_states)

    @staticmethod
    def _load_cuda(torch: Any, states: list[Any]) -> None:
        if not torch.cuda.is_available():
            warnings.warn(
                "statevault: CUDA RNG states were saved but no CUDA device is available; "
                "they are not restored",
                stacklevel=3,
            )
            return
        count = torch.cuda.device_count()
        if count != len(states):
            warnings.warn(
                f"statevault: {len(states)} CUDA RNG states saved, {count} devices now; "
                f"restoring the first {min(count, len(states))}",
                stacklevel=3,
            )
        torch.cuda.set_rng_state_all([s.cpu() for s in states[:count]])


def _python_state(saved: Any) -> tuple[Any, ...]:
    # random.setstate wants (version, tuple of 625 ints, gauss): tuples are kept by the format,
    # but accept lists too for states written by hand.
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)
