"""The life of one checkpoint, one module per step.

    save:    agree.py -> stage.py -> job.py (write) -> parts.py + commit.py   (save.py runs them)
    load:    open.py -> read.py (read, verify, decode) -> restore.py          (load.py runs them)
    verify:  open.py -> read every byte against its checksum -> decode         (verify.py)
    info.py: what a manifest records about the save that made it

Entry points: :func:`statevault.checkpoint.save.save`, :func:`statevault.checkpoint.load.load`
and :func:`statevault.checkpoint.verify.verify` (``sv.save``, ``sv.load``, ``sv.verify``).
"""

from statevault.checkpoint.open import OpenCheckpoint, local_path, open_checkpoint

__all__ = ["OpenCheckpoint", "local_path", "open_checkpoint"]
