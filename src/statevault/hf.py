"""``statevault.hf``: the Hugging Face ``Trainer`` with statevault checkpoints (imports
transformers; ``import statevault`` does not). See :mod:`statevault.integrations.hf`.

    from statevault.hf import Trainer   # instead of: from transformers import Trainer
"""

from statevault.integrations.hf import Trainer

__all__ = ["Trainer"]
