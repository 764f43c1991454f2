"""TensorFlow and Keras objects as Stateful: what ``sv.save`` stores for each, and how
``sv.load(into=...)`` puts it back.

=============================  ==============================================================
object                         state (every array a variable, restored by ``assign``)
=============================  ==============================================================
Keras layer / model            ``{"0.kernel": v, "0.bias": v, "2.seed_generator_state": v}``:
                               the variables of each layer under its position among its
                               parent's sub-layers (input layers not counted), by the name it
                               gave the variable; seed generator states included
Keras optimizer                ``{"0": iteration, "1": learning_rate, "2": slot, ...}``: every
                               variable in Keras's own order (a LossScaleOptimizer's scale and
                               counter included); empty before the first step
tf.Module                      ``{"dense.w": v, "layers.0.b": v}``: variables by attribute path
tf.random.Generator            ``{"state": v, "algorithm": int}``
keras.random.SeedGenerator     ``{"state": v}``
tf.Variable, tf.Tensor         array leaves (see ``statevault.adapters.tf_adapter``)
=============================  ==============================================================

Keys never contain Keras's auto-generated names (``dense_3``), so a checkpoint restores into
objects built again in the same process or in a new one.

An optimizer that has not stepped yet has no slot variables: restoring into it first builds it
(``optimizer.build(model.trainable_variables)``) for the model it belongs to: the model compiled
with it, else the Keras model most recently restored or saved (the one in the same ``into=``).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from statevault.adapters import adapter_named
from statevault.errors import CheckpointError, StateMismatchError
from statevault.state.stateful import Stateful

_RECENT_MODELS: list[weakref.ref[Any]] = []  # Keras layers seen by stateful_view, newest last


def stateful_view(value: object) -> Stateful | None:
    """A Stateful view of a TensorFlow / Keras object, or None for anything else."""
    keras = sys.modules.get("keras")
    if keras is not None:
        if isinstance(value, keras.optimizers.Optimizer):
            return KerasOptimizerState(value)
        if isinstance(value, keras.Layer):
            _remember(value)
            return KerasLayerState(value)
        if isinstance(value, keras.random.SeedGenerator):
            return VariablesState(value, {"state": value.state})
    if isinstance(value, tf.random.Generator):
        return GeneratorState(value)
    if isinstance(value, tf.Module):
        return VariablesState(value, _module_variables(value))
    return None


class VariablesState:
    """A fixed dict of variables: state_dict gives them, load_state_dict assigns into them."""

    def __init__(self, owner: Any, variables: Mapping[str, Any]) -> None:
        self.owner = owner
        self.variables = dict(variables)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.variables)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        _assign_all(self.variables, state_dict, type(self.owner).__name__)


class KerasLayerState(VariablesState):
    """A Keras layer or model (Sequential, functional, subclassed): see the module docstring."""

    def __init__(self, layer: Any) -> None:
        super().__init__(layer, layer_variables(layer))

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not self.variables and state_dict:
            raise CheckpointError(
                f"the Keras {type(self.owner).__name__} {self.owner.name!r} has no variables "
                "yet: build it before restoring (call it on a batch, or model.build(shape))"
            )
        super().load_state_dict(state_dict)


class KerasOptimizerState:
    """A Keras optimizer: every variable by index (Keras's own order), built before restore."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        if not self.optimizer.built:
            return {}  # nothing but its initial values: an open target for a restore
        return {str(i): v for i, v in enumerate(self.optimizer.variables)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if state_dict and not self.optimizer.built:
            build_for_restore(self.optimizer)
        _assign_all(self.state_dict(), state_dict, type(self.optimizer).__name__)


class GeneratorState:
    """A tf.random.Generator: its state variable and algorithm."""

    def __init__(self, generator: tf.random.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.state, "algorithm": int(self.generator.algorithm)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if state_dict.get("algorithm") != int(self.generator.algorithm):
            raise CheckpointError(
                f"tf.random.Generator: saved with algorithm {state_dict.get('algorithm')}, "
                f"the target uses {int(self.generator.algorithm)}; create the generator with "
                "the same alg= before restoring"
            )
        state = {"state": state_dict.get("state")}
        _assign_all({"state": self.generator.state}, state, "tf.random.Generator")


def layer_variables(layer: Any) -> dict[str, Any]:
    """Every variable of a Keras layer by its structural key (see the module docstring)."""
    found: dict[str, Any] = {}
    seen_variables: set[int] = set()
    _walk_layer(layer, "", found, seen_variables, set())
    for index, variable in enumerate(layer.variables):  # held outside the layers' own lists
        if id(variable) not in seen_variables:
            seen_variables.add(id(variable))
            found[f"_variables.{index}"] = variable
    return found


def _walk_layer(
    layer: Any, prefix: str, found: dict[str, Any], seen_variables: set[int], seen: set[int]
) -> None:
    if id(layer) in seen:
        return
    seen.add(id(layer))
    own = [*layer._trainable_variables, *layer._non_trainable_variables]
    own += [generator.state for generator in layer._seed_generators]
    for variable in own:
        if id(variable) in seen_variables:
            continue
        seen_variables.add(id(variable))
        key = prefix + variable.name
        suffix = 1
        while key in found:
            key, suffix = f"{prefix}{variable.name}#{suffix}", suffix + 1
        found[key] = variable
    keras = sys.modules["keras"]
    children = [
        child
        for child in layer._flatten_layers(include_self=False, recursive=False)
        if not isinstance(child, keras.layers.InputLayer)
    ]
    for index, child in enumerate(children):
        _walk_layer(child, f"{prefix}{index}.", found, seen_variables, seen)


def _module_variables(module: tf.Module) -> dict[str, Any]:
    pairs = module._flatten(predicate=lambda v: isinstance(v, tf.Variable), with_path=True)
    return {".".join(str(part) for part in path): variable for path, variable in pairs}


def build_for_restore(optimizer: Any) -> None:
    """Build an optimizer that has not stepped for its model, so that its slots can be filled."""
    model = _model_of(optimizer)
    if model is None:
        raise CheckpointError(
            f"the {type(optimizer).__name__} optimizer has not stepped yet and statevault "
            "cannot tell which model it trains: restore the model in the same into=, compile "
            "the model with it, or call optimizer.build(model.trainable_variables) first"
        )
    strategy = getattr(optimizer, "_distribution_strategy", None)  # slots mirrored like weights
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        optimizer.build(model.trainable_variables)


def _model_of(optimizer: Any) -> Any:
    layers = [layer for layer in (ref() for ref in reversed(_RECENT_MODELS)) if layer is not None]
    for layer in layers:
        if getattr(layer, "optimizer", None) is optimizer:
            return layer
    return next((layer for layer in layers if layer.trainable_variables), None)


def _remember(layer: Any) -> None:
    _RECENT_MODELS[:] = [ref for ref in _RECENT_MODELS if ref() not in (None, layer)][-15:]
    _RECENT_MODELS.append(weakref.ref(layer))


def _assign_all(targets: Mapping[str, Any], loaded: Mapping[str, Any], owner: str) -> None:
    """Assign every loaded value into its target variable; all keys must match."""
    missing = sorted(set(targets) - set(loaded))
    unexpected = sorted(set(loaded) - set(targets))
    if missing or unexpected:
        raise StateMismatchError(
            [f"{owner}/{k}" for k in missing], [f"{owner}/{k}" for k in unexpected], []
        )
    adapter = adapter_named("tensorflow")
    problems = [
        f"{owner}/{key}: {problem}"
        for key, target in targets.items()
        if (problem := adapter.mismatch(target, loaded[key])) is not None
    ]
    if problems:
        raise StateMismatchError([], [], problems)
    for key, target in targets.items():
        adapter.copy_into(target, loaded[key])
