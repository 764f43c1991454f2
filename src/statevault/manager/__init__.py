"""A run of checkpoints: naming, retention policies, resume, preemption, the writer lock."""

from statevault.manager.config import Replica, RunOptions
from statevault.manager.index import CheckpointRecord
from statevault.manager.manager import CheckpointManager
from statevault.manager.restoring import Restored
from statevault.manager.retention import KeepBest, KeepEveryNSteps, KeepLatest, RetentionPolicy

__all__ = [
    "CheckpointManager",
    "CheckpointRecord",
    "KeepBest",
    "KeepEveryNSteps",
    "KeepLatest",
    "Replica",
    "Restored",
    "RetentionPolicy",
    "RunOptions",
]
