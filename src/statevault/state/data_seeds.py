"""The seeds of a resumable loader: one per pass over the data, one per batch loaded in a worker.

A resumable loader never lets the data order depend on random streams it cannot save in a few
bytes. Each pass (epoch) gets a seed derived from a *source seed* and the pass number; the
sampler draws from random streams seeded by it (see ``isolated_rng``), and a worker process
reseeds torch's, python's and numpy's global streams from it before loading each batch. A
batch's augmentation is then a function of (pass seed, rank, batch number) only: not of which
worker loads it, nor of the batches that worker loaded before, so a resumed pass reproduces it
without loading the batches it skips.

The source seed is the seed of the loader's ``generator`` (or of the sampler's), else torch's
``initial_seed()``, which ``sv.RNGState`` restores: a run seeded once, or restored with its
RNG state, gets the same pass seeds after a restart.
"""

from __future__ import annotations

import hashlib
import random
import sys
from typing import Any

import numpy as np

_MASK63 = (1 << 63) - 1


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a fixed function of ``parts`` (the same on every machine)."""
    text = "\x1f".join(str(part) for part in parts).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def generators_of(owner: object) -> dict[str, Any]:
    """The torch.Generator attributes of ``owner`` (a sampler), by attribute name."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    attributes = getattr(owner, "__dict__", {})
    return {name: value for name, value in attributes.items() if isinstance(value, torch.Generator)}


def source_seed(loader: Any, samplers: list[Any]) -> int:
    """The seed the pass seeds derive from (see the module docstring)."""
    import torch

    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        return int(generator.initial_seed())
    for sampler in samplers:
        for found in generators_of(sampler).values():
            return int(found.initial_seed())
    return int(torch.initial_seed())


def reseed_process(seed: int) -> None:
    """Seed this process's global streams (torch's, python's, numpy's) from ``seed``: called in
    a worker process before it loads a batch."""
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
