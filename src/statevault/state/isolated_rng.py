"""Random streams of a sampler's own, kept apart from the program's.

A sampler may draw from torch's global generator (``RandomSampler`` without a generator draws
its seed there), from python's ``random``, numpy's global state, or from a ``torch.Generator``
it holds. A resumable loader runs every call into such a sampler inside
:meth:`IsolatedRandomness.active`: those streams are set to the pass's own (seeded from the
pass seed the first time, then as the sampler left them), and the program's are put back
afterwards. So the order of a pass is a function of its seed alone, and drawing it neither
consumes nor depends on the training's random streams.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from statevault.state.data_seeds import derive_seed, generators_of


class IsolatedRandomness:
    """The random streams one pass of a sampler draws from (see the module docstring)."""

    def __init__(self, seed: int, owners: list[Any]) -> None:
        import torch

        self._seed = seed
        self._saved: tuple[Any, Any, Any] | None = None
        # The sampler's generators are swapped for generators of the pass; the user's are
        # neither advanced nor read (but for their seed: see data_seeds.source_seed).
        self._swaps = [
            (owner, name, torch.Generator().manual_seed(derive_seed(seed, "generator", name)))
            for owner in owners
            for name in generators_of(owner)
        ]

    @contextmanager
    def active(self) -> Iterator[None]:
        import torch

        outer = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        originals = [getattr(owner, name) for owner, name, _ in self._swaps]
        for owner, name, mine in self._swaps:
            setattr(owner, name, mine)
        try:
            self._enter_own_streams(torch)
            yield
        finally:
            self._saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
            torch.set_rng_state(outer[0])
            random.setstate(outer[1])
            np.random.set_state(outer[2])
            for (owner, name, _), original in zip(self._swaps, originals, strict=True):
                setattr(owner, name, original)

    def _enter_own_streams(self, torch: Any) -> None:
        if self._saved is None:
            torch.default_generator.manual_seed(derive_seed(self._seed, "torch"))
            random.seed(derive_seed(self._seed, "python"))
            np.random.seed(derive_seed(self._seed, "numpy") & 0xFFFFFFFF)
            return
        torch.set_rng_state(self._saved[0])
        random.setstate(self._saved[1])
        np.random.set_state(self._saved[2])
