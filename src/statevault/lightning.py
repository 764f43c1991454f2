"""``statevault.lightning``: the Lightning ``CheckpointIO`` (imports Lightning; ``import
statevault`` does not). See :mod:`statevault.integrations.lightning` and the README.

    trainer = lightning.pytorch.Trainer(plugins=[statevault.lightning.CheckpointIO()])
"""

from statevault.integrations.lightning import CheckpointIO

__all__ = ["CheckpointIO"]
