"""Partial restores that must leave every object usable: ``strict=False`` skips the optimizer
states that do not fit their parameter (the next ``step()`` works), and ``into=`` may be the
object a checkpoint's root was saved from (``sv.save(model, p)``; ``sv.load(p, into=model)``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import statevault as sv


def _net(width: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2)
    )


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(8, 3)).pow(2).mean().backward()
    optimizer.step()


def _saved(tmp_path: Path) -> tuple[torch.nn.Sequential, torch.optim.Optimizer, Path]:
    torch.manual_seed(0)
    model = _net(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(3):
        _step(model, optimizer)
    path = tmp_path / "ck"
    sv.save({"model": model, "optimizer": optimizer}, path)
    return model, optimizer, path


# Parameters 0..3 are layer 0's weight and bias, layer 2's weight and bias. Widening the hidden
# layer from 4 to 5 changes the shapes of the first three, not of layer 2's bias (2,).
WRONG = {"optimizer/state/0", "optimizer/state/1", "optimizer/state/2"}


def _reported(mismatched: list[str]) -> set[str]:
    return {m.split(":", 1)[0] for m in mismatched if m.startswith("optimizer")}


@pytest.mark.parametrize("stepped", [False, True], ids=["fresh", "stepped"])
def test_strict_false_skips_optimizer_states_of_the_wrong_shape(
    tmp_path: Path, stepped: bool
) -> None:
    model, optimizer, path = _saved(tmp_path)
    wide = _net(5)
    wide_opt = torch.optim.AdamW(wide.parameters(), lr=0.5)
    if stepped:  # an optimizer that already holds moments of its own shapes
        _step(wide, wide_opt)
    with pytest.warns(UserWarning, match="partial restore"):
        state = sv.load(path, into={"model": wide, "optimizer": wide_opt}, strict=False)
    assert _reported(state.mismatched) == WRONG, state.mismatched
    assert any(m.startswith("model/0.weight") for m in state.mismatched)
    saved_bias = optimizer.state[model[2].bias]
    restored = wide_opt.state[wide[2].bias]
    assert torch.equal(restored["exp_avg"], saved_bias["exp_avg"]), "what fits is restored"
    assert float(restored["step"]) == 3.0
    assert wide_opt.param_groups[0]["lr"] == 0.01, "the hyperparameters are restored"
    for param in (wide[0].weight, wide[0].bias, wide[2].weight):
        moments = wide_opt.state.get(param, {})
        assert all(m.shape == param.shape for m in moments.values() if getattr(m, "ndim", 0)), (
            "no moment of the wrong shape is left in the optimizer"
        )
    _step(wide, wide_opt)  # the next step works
    assert wide_opt.state[wide[0].weight]["exp_avg"].shape == (5, 3)


def test_strict_reports_optimizer_states_of_the_wrong_shape(tmp_path: Path) -> None:
    _, _, path = _saved(tmp_path)
    wide = _net(5)
    wide_opt = torch.optim.AdamW(wide.parameters())
    with pytest.raises(sv.StateMismatchError) as info:
        sv.load(path, into={"model": wide, "optimizer": wide_opt})
    assert _reported(info.value.mismatched) == WRONG, info.value.mismatched
    assert wide_opt.state_dict()["state"] == {}, "a strict load changes nothing"


def test_optimizer_states_that_fit_are_all_restored(tmp_path: Path) -> None:
    model, optimizer, path = _saved(tmp_path)
    same = _net(4)
    same_opt = torch.optim.AdamW(same.parameters())
    state = sv.load(path, into={"model": same, "optimizer": same_opt})
    assert state.mismatched == []
    for mine, theirs in zip(same.parameters(), model.parameters(), strict=True):
        assert torch.equal(
            same_opt.state[mine]["exp_avg_sq"], optimizer.state[theirs]["exp_avg_sq"]
        )


def test_an_optimizer_over_other_parameters_is_not_restored(tmp_path: Path) -> None:
    """A different number of parameters: nothing of the optimizer can be matched up."""
    _, _, path = _saved(tmp_path)
    deeper = torch.nn.Sequential(_net(4), torch.nn.Linear(2, 2))
    deeper_opt = torch.optim.AdamW(deeper.parameters(), lr=0.5)
    with pytest.warns(UserWarning, match="partial restore"):
        state = sv.load(path, into={"optimizer": deeper_opt}, strict=False)
    assert any(m.startswith("optimizer") for m in state.mismatched), state.mismatched
    assert deeper_opt.param_groups[0]["lr"] == 0.5 and not deeper_opt.state
    _step(deeper, deeper_opt)


# ---- into= the root object ---------------------------------------------------------------------


def test_a_module_saved_as_the_root_restores_into_a_module(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = _net(4)
    sv.save(model, tmp_path / "ck")
    fresh = _net(4)
    weight = fresh[0].weight
    state = sv.load(tmp_path / "ck", into=fresh)
    assert fresh[0].weight is weight, "restored in place"
    for mine, theirs in zip(fresh.parameters(), model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert set(state) == set(model.state_dict())


def test_a_module_root_that_does_not_fit(tmp_path: Path) -> None:
    sv.save(_net(4), tmp_path / "ck")
    wide = _net(5)
    before = [p.detach().clone() for p in wide.parameters()]
    with pytest.raises(sv.StateMismatchError) as info:
        sv.load(tmp_path / "ck", into=wide)
    assert any(m.startswith("0.weight") for m in info.value.mismatched), info.value.mismatched
    assert all(torch.equal(a, b) for a, b in zip(wide.parameters(), before, strict=True))
    with pytest.warns(UserWarning, match="partial restore"):
        state = sv.load(tmp_path / "ck", into=wide, strict=False)
    assert any(m.startswith("0.weight") for m in state.mismatched)
    assert torch.equal(wide[2].bias, sv.load(tmp_path / "ck")["2.bias"]), "what fits is restored"


def test_a_tensor_saved_as_the_root_is_copied_into(tmp_path: Path) -> None:
    sv.save(torch.arange(4.0), tmp_path / "ck")
    target = torch.zeros(4)
    sv.load(tmp_path / "ck", into=target)
    assert torch.equal(target, torch.arange(4.0))
