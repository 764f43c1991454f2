"""User-facing state types, at the bottom of the package: nothing here imports the rest of
statevault (but its errors).

- :class:`Stateful`: anything with ``state_dict()`` / ``load_state_dict()``, saved as its state;
- :class:`RNGState`: every random stream a training step draws from;
- :class:`PerRank`: a value that differs between the ranks of a job;
- :func:`resumable`: a torch DataLoader whose position is saved and restored with the state.
"""

from statevault.state.per_rank import PerRank
from statevault.state.resumable import resumable
from statevault.state.rng import RNGState
from statevault.state.stateful import Stateful

__all__ = ["PerRank", "RNGState", "Stateful", "resumable"]
