"""statevault: safe, fast, complete checkpoints of deep-learning training state.

    import statevault as sv
    sv.save({"epoch": 10, "model": model, "optimizer": opt, "rng": sv.RNGState()}, "ckpt/10")
    state = sv.load("ckpt/10", into={"model": model, "optimizer": opt, "rng": sv.RNGState()})
    assert sv.verify("ckpt/10").ok

Importing statevault imports neither torch nor tensorflow.
"""

from statevault._version import __version__
from statevault.checkpoint.load import load
from statevault.checkpoint.restore import LoadedState
from statevault.checkpoint.save import save
from statevault.checkpoint.verify import VerifyReport, verify
from statevault.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedSaveError,
    RunLockedError,
    StateMismatchError,
    StorageError,
    UnsupportedFormatError,
    UnsupportedValueError,
)
from statevault.manager import (
    CheckpointManager,
    KeepBest,
    KeepEveryNSteps,
    KeepLatest,
    Replica,
    Restored,
    RetentionPolicy,
    RunOptions,
)
from statevault.state.per_rank import PerRank
from statevault.state.resumable import resumable
from statevault.state.rng import RNGState
from statevault.state.stateful import Stateful

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DistributedSaveError",
    "KeepBest",
    "KeepEveryNSteps",
    "KeepLatest",
    "LoadedState",
    "PerRank",
    "RNGState",
    "Replica",
    "Restored",
    "RetentionPolicy",
    "RunLockedError",
    "RunOptions",
    "StateMismatchError",
    "Stateful",
    "StorageError",
    "UnsupportedFormatError",
    "UnsupportedValueError",
    "VerifyReport",
    "__version__",
    "load",
    "resumable",
    "save",
    "verify",
]
