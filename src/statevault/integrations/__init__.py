"""Thin glue between statevault and training frameworks, each module importing its framework
(``import statevault`` imports none of them; the facades ``statevault.keras``,
``statevault.lightning``, ``statevault.hf`` and ``statevault.accelerate`` do):

=================  ===========================================================================
keras.py           the Keras callback (``tf_state.py``: TF state views; ``tf_workers.py``:
                   MultiWorkerMirroredStrategy roles)
lightning.py       a Lightning ``CheckpointIO``
hf.py              the Hugging Face ``Trainer`` subclass
accelerate.py      ``accelerator.save_state`` / ``load_state``
saves.py           saves to paths a framework names, sync or async, several in flight
paths.py           deleting and sweeping such checkpoints by statevault's rules
=================  ===========================================================================
"""
