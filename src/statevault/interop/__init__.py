"""Interop: export statevault checkpoints as safetensors, import other tools' checkpoints.

=========================  ==================================================================
:func:`export_safetensors`  every array of a checkpoint (or a subtree) into one safetensors
                            file, named by key path; sharded tensors consolidated; streamed
:func:`export_hf`           the same as HF-style shards + ``model.safetensors.index.json``
:func:`import_checkpoint`   a TensorFlow checkpoint, safetensors file, ``torch.save`` file or
                            DCP directory (only with ``from_="dcp"``: its metadata is a
                            pickle) -> a statevault checkpoint
:class:`ByteProgress`       what the three take as ``progress=``: told the total bytes, then
                            each batch as it is done (for a progress bar)
:func:`deploy`              the model of a checkpoint, built by the user's function, saved for
                            serving: SavedModel, ``torch.export`` or ``save_pretrained``
=========================  ==================================================================

Example::

    from statevault.interop import export_safetensors, import_checkpoint

    export_safetensors("ckpt/step_1000", "model.safetensors", only="model")
    import_checkpoint("tf_ckpt/ckpt-3", "ckpt/from_tf")

Neither torch nor tensorflow is imported by this package until an import needs it.
"""

from statevault.interop.deploy import FORMATS, DeployReport, deploy
from statevault.interop.export import ExportReport, export_hf, export_safetensors
from statevault.interop.importing import SOURCES, ImportReport, detect, import_checkpoint
from statevault.interop.progress import ByteProgress

__all__ = [
    "FORMATS",
    "SOURCES",
    "ByteProgress",
    "DeployReport",
    "ExportReport",
    "ImportReport",
    "deploy",
    "detect",
    "export_hf",
    "export_safetensors",
    "import_checkpoint",
]
