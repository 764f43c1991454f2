"""``statevault.accelerate``: ``accelerator.save_state`` / ``load_state`` through statevault
(``import statevault`` imports no framework). See :mod:`statevault.integrations.accelerate`.

    statevault.accelerate.install(accelerator)   # then accelerator.save_state() as usual
"""

from statevault.integrations.accelerate import AcceleratorCheckpoints, install

__all__ = ["AcceleratorCheckpoints", "install"]
