"""Restore a loaded tree into live objects (``load(into=...)``), checking the fit first.

Everything is compared before anything is changed, so a strict load that raises leaves the
targets untouched. The comparison walks target and checkpoint side by side:

- arrays: same kind, shape and dtype;
- dicts: keys the target has and the checkpoint lacks are *missing*, the reverse *unexpected*
  (only when the saved value holds arrays: a plain value is returned in the tree, not lost);
  an empty dict in a target is open (an optimizer's ``state`` before its first step);
- lists and tuples: same length; plain values are not compared (the checkpoint's win);
- Stateful targets: their current ``state_dict()`` is the target (narrowed by a
  ``restorable_state(saved)`` method where the Stateful has one: RNGState asks only for the
  streams the checkpoint has);
- torch optimizers: hyperparameters and parameter groups as above; each saved per-parameter
  state (``state/<i>``: Adam's moments...) must fit its parameter: the live state's shapes
  where the optimizer has stepped, else the parameter's shape (a tensor of another number of
  dimensions, such as LBFGS's flat vectors, or one that broadcasts to the parameter, such as
  Adafactor's factored moments, is not held to it).

``into`` is a mapping mirroring the saved tree, or the one object the checkpoint's root was
saved from (``sv.save(model, p)``; ``sv.load(p, into=model)``).

With ``strict=False`` whatever fits is restored: tensors are copied, a module gets the matching
part of its state dict (``load_state_dict(strict=False)``), an optimizer all but the
per-parameter states that do not fit (those parameters keep the state they had, if any, so the
next ``step()`` works), any other Stateful that does not fit is left as it is; a warning lists
what was not restored and the result carries the lists.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from statevault.adapters import adapter_for
from statevault.engine.parallel import run_sized
from statevault.errors import StateMismatchError
from statevault.format.tree import join_path
from statevault.state.per_rank import PerRank
from statevault.state.stateful import as_stateful, restorable_state


class LoadedState(dict):  # type: ignore[type-arg]
    """The loaded tree (a dict) with what a non-strict ``into=`` load could not restore."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.missing, self.unexpected, self.mismatched = [], [], []


@dataclass
class _Fit:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def extend(self, other: _Fit) -> None:
        self.missing += other.missing
        self.unexpected += other.unexpected
        self.mismatched += other.mismatched


def compare(target: Any, loaded: Any, path: str, fit: _Fit) -> None:
    """Record in ``fit`` how ``loaded`` fails to fit ``target`` (see the module docstring)."""
    if isinstance(target, PerRank):  # the loaded branch is this rank's own value
        compare(target.value, loaded, path, fit)
        return
    adapter = adapter_for(target)
    if adapter is not None:
        problem = adapter.mismatch(target, loaded)
        if problem is not None:
            fit.mismatched.append(f"{path}: {problem}")
    elif (stateful := as_stateful(target)) is not None:
        fit.extend(_stateful_fit(stateful, loaded, path)[0])
    elif isinstance(target, Mapping):
        _compare_mappings(target, loaded, path, fit)
    elif isinstance(target, (list, tuple)):
        if not isinstance(loaded, (list, tuple)) or len(loaded) != len(target):
            size = len(loaded) if isinstance(loaded, (list, tuple)) else type(loaded).__name__
            fit.mismatched.append(f"{path}: {len(target)} items in the target, {size} saved")
            return
        for i, (t, v) in enumerate(zip(target, loaded, strict=True)):
            compare(t, v, join_path(path, i), fit)


def _compare_mappings(target: Mapping[Any, Any], loaded: Any, path: str, fit: _Fit) -> None:
    if not isinstance(loaded, Mapping):
        fit.mismatched.append(f"{path}: a mapping in the target, a {type(loaded).__name__} saved")
        return
    if not target:
        return
    fit.missing += [join_path(path, k) for k in target if k not in loaded]
    # A saved plain value with no place in the target is not lost: it is in the returned tree.
    fit.unexpected += [
        join_path(path, k) for k in loaded if k not in target and _holds_array(loaded[k])
    ]
    for key in target:
        if key in loaded:
            compare(target[key], loaded[key], join_path(path, key), fit)


def _holds_array(value: Any) -> bool:
    if adapter_for(value) is not None:
        return True
    if isinstance(value, Mapping):
        return any(_holds_array(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_array(v) for v in value)
    return False


def restore_into(into: Any, loaded: Any, *, strict: bool) -> Any:
    """Check the fit of ``loaded`` into ``into``, then restore; returns the loaded tree (a
    :class:`LoadedState` when it is a mapping, carrying what was not restored)."""
    fit = _Fit()
    compare(into, loaded, "", fit)
    if strict and not fit.ok:
        raise StateMismatchError(fit.missing, fit.unexpected, fit.mismatched)
    copies = _HostCopies()
    _apply(into, loaded, "", fit, copies)
    copies.flush()
    if not isinstance(loaded, Mapping):  # a root tensor or value: nothing to carry the lists
        result: Any = loaded
    else:
        result = LoadedState(loaded)
        result.missing, result.unexpected, result.mismatched = (
            fit.missing,
            fit.unexpected,
            fit.mismatched,
        )
    if not fit.ok:
        warnings.warn(
            f"statevault: partial restore: {len(fit.missing)} missing, "
            f"{len(fit.unexpected)} unexpected, {len(fit.mismatched)} mismatched "
            "(see .missing / .unexpected / .mismatched on the result)",
            stacklevel=3,
        )
    return result


class _HostCopies:
    """Array copies that are plain host memcpys, held back and then run on every CPU.

    Restoring a state of many tensors is mostly memcpy; one thread would leave the other cores
    idle. Copies of any other kind (device, DTensor, TensorFlow) and Stateful restores run in
    the tree's order, each after the held-back copies before it (``flush``), so nothing is
    reordered that could observe the difference.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[int, Callable[[], object]]] = []

    def add(self, size: int, call: Callable[[], object]) -> None:
        self.pending.append((size, call))

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        run_sized(pending, "statevault-restore")


def _apply(target: Any, loaded: Any, path: str, fit: _Fit, copies: _HostCopies) -> None:
    if isinstance(target, PerRank):
        _apply(target.value, loaded, path, fit, copies)
        return
    adapter = adapter_for(target)
    if adapter is not None:
        if adapter.mismatch(target, loaded) is None:
            size = adapter.host_copy_bytes(target, loaded)
            if size:
                copies.add(size, functools.partial(adapter.copy_into, target, loaded))
            else:
                copies.flush()
                adapter.copy_into(target, loaded)
    elif (stateful := as_stateful(target)) is not None:
        copies.flush()
        _apply_stateful(stateful, loaded, path, fit)
    elif isinstance(target, Mapping) and isinstance(loaded, Mapping):
        for key, value in target.items():
            if key in loaded:
                _apply(value, loaded[key], join_path(path, key), fit, copies)
    elif (
        isinstance(target, (list, tuple))
        and isinstance(loaded, (list, tuple))
        and len(target) == len(loaded)
    ):
        for i, (t, v) in enumerate(zip(target, loaded, strict=True)):
            _apply(t, v, join_path(path, i), fit, copies)


def _apply_stateful(target: Any, loaded: Any, path: str, fit: _Fit) -> None:
    own, skip = _stateful_fit(target, loaded, path)
    if own.ok:
        target.load_state_dict(loaded)
        return
    if skip is not None:  # an optimizer whose groups fit: all but the states that do not
        target.load_state_dict(_without_states(target, loaded, skip))
        return
    if _is_torch_module(target) and isinstance(loaded, Mapping):
        bad = {p.split(":", 1)[0] for p in own.mismatched}
        kind: Any = type(loaded)
        fitting = kind((k, v) for k, v in loaded.items() if join_path(path, k) not in bad)
        if hasattr(loaded, "_metadata"):
            fitting._metadata = loaded._metadata
        target.load_state_dict(fitting, strict=False)
        return
    fit.mismatched.append(f"{path}: not restored ({type(target).__name__} does not fit)")


def _is_torch_module(value: Any) -> bool:
    return any(
        f"{kind.__module__}.{kind.__qualname__}" == "torch.nn.modules.module.Module"
        for kind in type(value).__mro__
    )


# ---- Stateful targets, and torch optimizers' per-parameter states ------------------------------

# Optimizers whose ``state`` is not kept per parameter (LBFGS keeps flat vectors under the
# first parameter's index): their state is compared as a plain tree.
_NOT_PER_PARAMETER = frozenset({"LBFGS"})


def _stateful_fit(stateful: Any, loaded: Any, path: str) -> tuple[_Fit, set[Any] | None]:
    """How ``loaded`` fails to fit ``stateful``, and, for a torch optimizer whose parameter
    groups and hyperparameters fit, the keys of the saved per-parameter states that do not fit
    (restoring all the others is safe); None for any other Stateful."""
    fit = _Fit()
    state = restorable_state(stateful, loaded)
    params = _optimizer_params(stateful, state, loaded)
    if params is None:
        compare(state, loaded, path, fit)
        return fit, None
    compare(_but_states(state), _but_states(loaded), path, fit)
    groups_fit = fit.ok
    where = join_path(path, "state")
    live, saved = state["state"], loaded["state"]
    fit.missing += [join_path(where, key) for key in live if key not in saved]
    skip = set()
    for key, entry in saved.items():
        problem = _state_problem(entry, live.get(key), params.get(key))
        if problem is not None:
            skip.add(key)
            fit.mismatched.append(f"{join_path(where, key)}: {problem}")
    return fit, skip if groups_fit else None


def _optimizer_params(optimizer: Any, state: Any, loaded: Any) -> dict[Any, Any] | None:
    """Saved parameter index -> the live parameter it restores into, as torch's
    ``Optimizer.load_state_dict`` pairs them (group by group, in order); None unless
    ``optimizer`` and ``loaded`` look like a torch optimizer and its state dict."""
    if type(optimizer).__name__ in _NOT_PER_PARAMETER:
        return None
    groups = getattr(optimizer, "param_groups", None)
    if not (_is_optimizer_state(state) and _is_optimizer_state(loaded)):
        return None
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
        return None
    saved_ids = itertools.chain.from_iterable(g.get("params", ()) for g in loaded["param_groups"])
    live = itertools.chain.from_iterable(g.get("params", ()) for g in groups)
    return dict(zip(saved_ids, live, strict=False))


def _is_optimizer_state(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and isinstance(value.get("state"), Mapping)
        and isinstance(value.get("param_groups"), (list, tuple))
        and all(isinstance(g, Mapping) for g in value["param_groups"])
    )


def _but_states(state: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in state.items() if key != "state"}


def _state_problem(entry: Any, live: Any, param: Any) -> str | None:
    """Why the saved state of one parameter does not fit it, or None: the optimizer's own state
    for that parameter where it has one, else the parameter's shape (module docstring)."""
    if param is None:
        return "no such parameter in the optimizer's groups"
    if live is not None:
        own = _Fit()
        compare(live, entry, "", own)
        problems = [f"missing {k}" for k in own.missing] + own.mismatched
        problems += [f"unexpected {k}" for k in own.unexpected]
        return "; ".join(problems) if problems else None
    if not isinstance(entry, Mapping):
        return None
    wanted = tuple(getattr(param, "shape", ()))
    for key, value in entry.items():
        shape = getattr(value, "shape", None)
        if shape is None or len(shape) != len(wanted) or not shape:
            continue  # a scalar (step), or another layout (see the module docstring)
        if any(s not in (w, 1) for s, w in zip(shape, wanted, strict=True)):
            return (
                f"{key} is {list(shape)} in the checkpoint, its parameter {list(wanted)} in the "
                "target"
            )
    return None


def _without_states(optimizer: Any, loaded: Mapping[str, Any], skip: set[Any]) -> dict[str, Any]:
    """``loaded`` without the per-parameter states ``skip``: those parameters, and those the
    checkpoint has no state for, keep the state the optimizer has for them now (if any)."""
    live = optimizer.state_dict()["state"]
    kept = {key: entry for key, entry in loaded["state"].items() if key not in skip}
    for key, entry in live.items():
        if key not in kept:
            kept[key] = entry
    return {**loaded, "state": kept}
