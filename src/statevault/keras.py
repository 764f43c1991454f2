"""``statevault.keras``: the Keras callback (imports TensorFlow and Keras; ``import statevault``
does not). See :mod:`statevault.integrations.keras` and docs/tensorflow.md."""

from statevault.integrations.keras import CheckpointCallback, Resume
from statevault.integrations.tf_workers import WorkerCheckpoints

__all__ = ["CheckpointCallback", "Resume", "WorkerCheckpoints"]
