"""The conformance suite passes the built-ins and catches add-ons that break each rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from zae_trainer import AddOn
from zae_trainer.testing import (
    BUILTIN_FACTORIES,
    check_addon,
    check_composes_with_builtins,
    check_no_per_step_sync,
    check_pickling,
    check_state_round_trip,
    usable_builtins,
)
from zae_trainer.errors import AddOnDefinitionError


@pytest.mark.parametrize("name", sorted(usable_builtins()))
def test_every_usable_builtin_conforms(name: str, tmp_path: Path) -> None:
    cls = usable_builtins()[name]
    report = check_addon(cls, BUILTIN_FACTORIES[name](tmp_path), workdir=tmp_path)
    assert report["hooks"] == "ok" and report["pickle"] == "ok"
    assert report["state"] == ["ckpt", "safetensors"]
    assert report["sync"] <= 1


class ReadsLossEveryStep(AddOn):
    def on_after_backward(self, trainer: Any) -> None:
        self.last = trainer.model.weight.grad.norm().item()  # a host read per step


class ForgetfulCounter(AddOn):
    def __init__(self) -> None:
        self.steps = 0

    def on_after_optimizer_step(self, trainer: Any) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # forgets to restore


class LeaksBetweenRuns(AddOn):
    """Argument order cannot reach an add-on (dispatch order is declared), but state shared
    between trainers can: this one scales gradients by how many trainers were built before."""

    built = 0

    def on_run_begin(self, trainer: Any) -> None:
        LeaksBetweenRuns.built += 1
        self.scale = 1.0 / LeaksBetweenRuns.built

    def on_before_optimizer_step(self, trainer: Any) -> None:
        for p in trainer.model.parameters():
            p.grad.mul_(self.scale)


def test_a_per_step_host_read_is_caught() -> None:
    with pytest.raises(AssertionError, match=r"host reads of tensor values .* device synchronisation per step"):
        check_no_per_step_sync(ReadsLossEveryStep)


def test_state_that_does_not_restore_is_caught(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="ForgetfulCounter: state_dict after a ckpt checkpoint round trip differs"):
        check_state_round_trip(ForgetfulCounter, workdir=tmp_path)


def test_results_that_differ_between_compositions_are_caught(tmp_path: Path) -> None:
    if not usable_builtins():
        pytest.skip("needs at least one built-in to compose with")
    with pytest.raises(AssertionError, match="final parameters differ between argument orders"):
        check_composes_with_builtins(LeaksBetweenRuns, workdir=tmp_path)


def test_an_addon_workers_cannot_import_is_caught() -> None:
    class Configured(AddOn):
        def __init__(self, *, level: int = 1) -> None:
            self.level = level

    # a class defined inside a function cannot be pickled by reference: the check says so
    with pytest.raises(AssertionError, match="define the class at module top level"):
        check_pickling(Configured(level=3))


def test_a_misspelt_hook_is_caught() -> None:
    class Misspelt(AddOn):
        def on_epoch_ned(self, trainer: Any) -> None:
            pass

    with pytest.raises(AddOnDefinitionError, match="on_epoch_end"):
        check_addon(Misspelt)


def test_a_well_behaved_addon_passes_everything(tmp_path: Path) -> None:
    report = check_addon(Counter, workdir=tmp_path)
    assert report["state"] == ["ckpt", "safetensors"] and report["sync"] == 0


class Counter(AddOn):
    def __init__(self) -> None:
        self.steps = 0
        self.total = torch.zeros(())

    def on_after_optimizer_step(self, trainer: Any) -> None:
        self.steps += 1
        self.total += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.total = state["total"].clone()
