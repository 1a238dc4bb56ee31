"""``del trainer`` frees the trainer and its add-ons at once: nothing in them forms a reference cycle.

A trainer caught in a cycle survives ``del`` until the cycle collector happens to run, holding
its model, optimizer state, open log files and logger runs; zae-engine's own tests
(``test_web_logger.py``: ``test_wandb_del``, ``test_neptune_del``) expect it gone at once.
Every test here turns the collector off, so only reference counting can free anything, and
watches the objects through weak references.

What used to close cycles, and what holds instead (see ``zae_trainer.dispatch`` and
``AddOn.trainer``): the dispatcher held the trainer (now the trainer passes itself to every
call), the per-batch event callers closed over it (now ``fire(trainer)``), each add-on held it
as ``addon.trainer`` (now a weak reference behind a property), and with several optimizers the
trainer kept bound methods of itself (now only for the length of ``run()``).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from core_helpers import TinyTrainer, tiny_loader, tiny_trainer
from logging_readers import read_wandb_run, wandb_run_file
from zae_trainer import AddOn
from zae_trainer.addons import GradientClippingAddon, LocalLoggerAddon, StateManagerAddon, WandBLoggerAddon


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Only reference counting frees objects while a test runs (the collector is off)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _watch(trainer: Any) -> tuple[list[str], list[weakref.ref[Any]]]:
    objects = [trainer, *trainer.addon_instances]
    return [type(o).__name__ for o in objects], [weakref.ref(o) for o in objects]


def _alive(names: list[str], refs: list[weakref.ref[Any]]) -> list[str]:
    return [name for name, ref in zip(names, refs) if ref() is not None]


class FailsAtStep2(TinyTrainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        if self.progress_checker.step == 2:
            raise ValueError("step 2 fails")
        return super().train_step(batch)


@pytest.mark.parametrize("when", ["never_run", "after_run", "after_failed_run"])
def test_core_trainer_with_builtin_addons_is_freed_on_del(tmp_path: Path, no_gc: None, when: str) -> None:
    addons = (
        StateManagerAddon(save_path=tmp_path / "ckpt"),
        LocalLoggerAddon(log_dir=tmp_path / "logs"),
        GradientClippingAddon(max_norm=1.0),
        WandBLoggerAddon(project="refs", mode="offline", dir=str(tmp_path)),
    )
    base = FailsAtStep2 if when == "after_failed_run" else TinyTrainer
    trainer = tiny_trainer(base.add_on(*addons), log_every_n_steps=1)
    if when == "after_run":
        trainer.run(2, tiny_loader(24), tiny_loader(16, seed=1))
    elif when == "after_failed_run":
        try:
            trainer.run(2, tiny_loader(24), tiny_loader(16, seed=1))
        except ValueError as exc:
            assert "step 2 fails" in str(exc)
        else:
            pytest.fail("the run did not raise")
    run_id = trainer.get_addon("wandb_logger").run_id
    names, refs = _watch(trainer)
    assert len(names) == 5
    del trainer
    assert _alive(names, refs) == []
    if when != "never_run":  # the add-ons really ran: files written, the W&B run closed
        assert (tmp_path / "logs" / "metrics.jsonl").stat().st_size > 0
        assert run_id is not None
        assert read_wandb_run(wandb_run_file(tmp_path, run_id)).exit_code == (0 if when == "after_run" else 1)
    if when == "after_run":
        assert any(p.suffix == ".ckpt" for p in (tmp_path / "ckpt").iterdir())


class TwoLosses(TinyTrainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": {"first": nn.functional.mse_loss(self.model[0](x), y),
                         "second": nn.functional.mse_loss(self.model[1](x), y)}}

    def test_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model[0](x), y)}


@pytest.mark.parametrize("run", [False, True])
def test_trainer_with_several_optimizers_is_freed_on_del(no_gc: None, run: bool) -> None:
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 1)])
    optimizers = {"first": torch.optim.SGD(model[0].parameters(), lr=0.1),
                  "second": torch.optim.SGD(model[1].parameters(), lr=0.1)}
    trainer = TwoLosses.add_on(GradientClippingAddon(max_norm=1.0))(
        model, "cpu", optimizer=optimizers, log_bar=False, handle_signals=False)
    if run:
        before = model[1].weight.detach().clone()
        trainer.run(1, tiny_loader(24))
        assert not torch.equal(model[1].weight, before)  # the second optimizer stepped
        assert trainer.progress_checker.step == 3
    names, refs = _watch(trainer)
    del trainer
    assert _alive(names, refs) == []


def test_step_driven_validation_and_max_steps_leave_no_cycle(no_gc: None) -> None:
    trainer = tiny_trainer(TinyTrainer.add_on(GradientClippingAddon(max_norm=1.0)), valid_every_n_steps=2)
    trainer.run(None, tiny_loader(40), tiny_loader(16, seed=1), max_steps=4)
    assert trainer.progress_checker.step == 4
    names, refs = _watch(trainer)
    del trainer
    assert _alive(names, refs) == []


class Probe(AddOn):
    def on_run_begin(self, trainer: Any) -> None:
        assert self.trainer is trainer


def test_addon_trainer_is_the_live_trainer_and_a_clear_error_once_it_is_gone(no_gc: None) -> None:
    loose = Probe()
    with pytest.raises(RuntimeError, match="'Probe' was never attached to a trainer"):
        loose.trainer
    trainer = tiny_trainer(TinyTrainer.add_on(Probe))
    trainer.run(1, tiny_loader(8))  # the hook's assertion ran
    addon = trainer.get_addon(Probe)
    assert addon.trainer is trainer
    del trainer
    with pytest.raises(RuntimeError, match="'Probe' outlived its trainer, which was freed"):
        addon.trainer


# -- zae-engine's layer: its web loggers finish their runs when the trainer is deleted ----------


@pytest.mark.parametrize("run", [False, True])
def test_compat_trainer_del_frees_it_and_finishes_both_web_logger_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_gc: None, run: bool
) -> None:
    from zae_trainer.compat import Trainer
    from zae_trainer.compat.addons import NeptuneLoggerAddon, StateManagerAddon as ZaeStateManager
    from zae_trainer.compat.addons import WandBLoggerAddon as ZaeWandB

    class DummyTrainer(Trainer):  # zae-engine's test trainer: a fixed signature
        def __init__(self, model: Any, optimizer: Any = None, scheduler: Any = None, mode: str = "train") -> None:
            super().__init__(model, torch.device("cpu"), mode, optimizer, scheduler, log_bar=False,
                             handle_signals=False)

        def train_step(self, batch: Any) -> dict[str, Any]:
            x, y = batch
            return {"loss": nn.functional.mse_loss(self.model(x), y), "acc": 0.5}

        def test_step(self, batch: Any) -> dict[str, Any]:
            return self.train_step(batch)

    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(tmp_path / "neptune"))
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    web_logger = {"wandb": {"project": "refs", "dir": str(tmp_path)},
                  "neptune": {"project_name": "ws/refs", "api_tkn": "not-a-token", "mode": "offline"}}
    trainer = DummyTrainer.add_on(ZaeWandB, NeptuneLoggerAddon, ZaeStateManager)(
        model, opt, torch.optim.lr_scheduler.StepLR(opt, 1), web_logger=web_logger, save_path=str(tmp_path / "z"))
    wandb_run, neptune_run = trainer.web_logger["wandb"], trainer.web_logger["neptune"]
    assert wandb_run.is_live() and neptune_run.is_live()
    if run:
        trainer.run(1, tiny_loader(24), tiny_loader(16, seed=1))
    trainer_id = id(trainer)
    names, refs = _watch(trainer)
    del trainer
    assert _alive(names, refs) == []
    assert trainer_id not in {id(obj) for obj in gc.get_objects()}  # zae-engine's own check
    assert not wandb_run.is_live() and not neptune_run.is_live()  # finished by the trainer's finalizer
    log = read_wandb_run(wandb_run_file(tmp_path, wandb_run.id))
    assert log.exit_code == 0
    assert len(log.series("loss")) == (5 if run else 0)  # 3 training + 2 validation batches
