"""Deployment hand-off: a statevault checkpoint's model, built by your code, filled with the
checkpoint's weights (verified), exported in the format that serves it. Example::

    from statevault.interop.deploy import deploy

    deploy("runs/exp1/step_000001000", "myproject.model:build", "export/model")
    # statevault deploy runs/exp1/step_000001000 --build myproject.model:build --to export/model

Steps: resolve the builder (a callable, ``package.module:function`` or ``path/file.py:function``)
-> build the model (the builder may return ``(model, example_args)``) -> pick the subtree that
holds its weights (``only``; by default ``model``, else Lightning's ``state_dict``, else the
whole checkpoint) -> ``statevault.load(..., into=model)``: every byte checked against its
checksum, every key and shape matched (strict) -> export under a temporary name -> rename.

=================  ===========================================  ============================
format             for                                          written
=================  ===========================================  ============================
``savedmodel``     a Keras model                                ``model.export(..)``: a TF
                                                                SavedModel directory (serving
                                                                endpoint ``serve``)
``torch-export``   a torch ``nn.Module`` and example arguments  ``torch.export.save`` of
                                                                ``torch.export.export`` (.pt2)
``hf``             a Hugging Face ``PreTrainedModel``           ``save_pretrained``: config
                                                                and safetensors weights
=================  ===========================================  ============================

Only the model is exported: its parameters and buffers, in eval mode. The optimizer state, the
LR scheduler, random streams, data position, trainer state and plain values of the checkpoint
are not (they stay in the checkpoint). An existing output is replaced only with ``overwrite``
and only when it is an earlier export of the same format.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from statevault.checkpoint.load import load
from statevault.checkpoint.open import open_checkpoint
from statevault.errors import CheckpointError, CheckpointExistsError
from statevault.format import tree_paths

FORMATS = ("savedmodel", "torch-export", "hf")
_WEIGHT_KEYS = ("model", "state_dict")  # where trainers keep the model: ours, Lightning's


@dataclass(frozen=True)
class DeployReport:
    """What :func:`deploy` wrote: the ``format``, the ``target`` path, the checkpoint subtree
    the weights came from (``only``; None: the whole checkpoint) and the model's class."""

    source: str
    target: str
    format: str
    only: str | None
    model: str


def deploy(
    checkpoint: str | os.PathLike[str],
    build: Callable[[], Any] | str,
    output: str | os.PathLike[str],
    *,
    format: str | None = None,
    only: str | None = None,
    example_args: Sequence[Any] | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> DeployReport:
    """Build the model, load ``checkpoint``'s weights into it (verified), export it to
    ``output`` (see the module docstring). ``format``: one of :data:`FORMATS` (default: by
    the model's type). ``example_args``: the arguments ``torch.export`` traces the model with
    (or let the builder return ``(model, example_args)``)."""
    source, target = os.fspath(checkpoint), os.path.abspath(os.fspath(output))
    _check_target(target, format, overwrite)
    builder = resolve_builder(build)
    try:
        built = builder()
    except Exception as exc:
        raise ValueError(f"the builder {build!r} failed: {type(exc).__name__}: {exc}") from exc
    model, example = built if isinstance(built, tuple) else (built, example_args)
    kind = format or detect_format(model)
    if kind not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {kind!r}")
    _check_target(target, kind, overwrite)
    subtree = only if only is not None else default_subtree(source, storage_options)
    load(source, into=model, only=subtree, storage_options=storage_options)
    target = os.path.abspath(os.fspath(output))
    stem, suffix = os.path.splitext(target)
    temporary = f"{stem}.tmp-{uuid.uuid4().hex[:12]}{suffix}"  # .pt2 last: torch.export's wish
    try:
        try:
            _EXPORTERS[kind](model, temporary, example)
        except (ValueError, TypeError):
            raise
        except Exception as exc:
            raise CheckpointError(f"{kind} export of {source} failed: {exc}") from exc
        _replace(temporary, target)
    finally:
        _remove(temporary)
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    return DeployReport(source, target, kind, subtree, name)


def resolve_builder(build: Callable[[], Any] | str) -> Callable[[], Any]:
    """A callable, or ``package.module:function`` / ``path/to/file.py:function``."""
    if callable(build):
        return build
    module_name, _, attribute = build.rpartition(":")
    if not module_name or not attribute:
        raise ValueError(f"--build takes MODULE:FUNCTION or FILE.py:FUNCTION, not {build!r}")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location("statevault_deploy_builder", module_name)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot load {module_name!r} as a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"{module_name} has no function {attribute!r}")
    return function  # type: ignore[no-any-return]


def detect_format(model: Any) -> str:
    """``savedmodel`` for a Keras model, ``hf`` for a Hugging Face model, ``torch-export`` for
    any other torch module."""
    kinds = [f"{k.__module__}.{k.__qualname__}" for k in type(model).__mro__]
    if any(k.startswith("keras.") for k in kinds):
        return "savedmodel"
    if any(k.startswith("transformers.") for k in kinds) and hasattr(model, "save_pretrained"):
        return "hf"
    if "torch.nn.modules.module.Module" in kinds:
        return "torch-export"
    raise TypeError(
        f"the builder returned a {type(model).__name__}: deploy takes a Keras model, a Hugging "
        "Face model or a torch nn.Module"
    )


def default_subtree(checkpoint: str, storage_options: Mapping[str, Any] | None) -> str | None:
    """``model`` when the checkpoint has it, else ``state_dict`` (Lightning), else None."""
    with open_checkpoint(checkpoint, storage_options) as opened:
        for key in _WEIGHT_KEYS:
            try:
                tree_paths.subtree(opened.manifest.tree, key, opened.directory)
            except KeyError:
                continue
            return key
    return None


def _export_savedmodel(model: Any, path: str, example: Any) -> None:
    model.export(path, format="tf_saved_model", verbose=False)


def _export_torch(model: Any, path: str, example: Any) -> None:
    import torch

    if example is None:
        raise ValueError(
            "torch.export needs example arguments: pass example_args=, or let the builder "
            "return (model, example_args)"
        )
    program = torch.export.export(model.eval(), tuple(example))
    torch.export.save(program, path)


def _export_hf(model: Any, path: str, example: Any) -> None:
    model.eval()
    model.save_pretrained(path)


_EXPORTERS: dict[str, Callable[[Any, str, Any], None]] = {
    "savedmodel": _export_savedmodel,
    "torch-export": _export_torch,
    "hf": _export_hf,
}


def _check_target(target: str, kind: str | None, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``, and then anything but an earlier export
    of ``kind`` (None: not known yet, checked again once the model is built)."""
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise CheckpointExistsError(f"{target} exists; pass overwrite=True (--overwrite)")
    if kind is not None and not _is_export(target, kind):
        raise CheckpointError(
            f"{target} is not an earlier {kind} export: not replacing it (remove it yourself, "
            "or choose another output path)"
        )


def _is_export(path: str, kind: str) -> bool:
    if kind == "torch-export":
        return os.path.isfile(path)
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    marker = "saved_model.pb" if kind == "savedmodel" else "config.json"
    return os.path.isfile(os.path.join(path, marker))


def _replace(temporary: str, target: str) -> None:
    if not os.path.lexists(target):
        os.rename(temporary, target)
        return
    old = f"{target}.old-{uuid.uuid4().hex[:12]}"
    os.rename(target, old)
    os.rename(temporary, target)
    _remove(old)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)
