"""zae_trainer.compat.addons used as zae-engine users configure them: keywords to the trainer.

State manager: zae-engine's folder layout written by ``save_state()`` and at improving epochs,
read back by ``load_state()`` and by the core state manager. Web loggers: the real W&B and
Neptune clients, offline, both configured by one ``web_logger`` dict and read back from disk.
"""

from __future__ import annotations

import gc
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from logging_readers import read_wandb_run, wandb_run_file
from zae_trainer.addons.checkpoint.errors import CheckpointNotFoundError
from zae_trainer.addons.neptune_logger import offline_run_folders, read_offline_run
from zae_trainer.compat import Trainer
from zae_trainer.compat.addons import NeptuneLoggerAddon, StateManagerAddon, WandBLoggerAddon


def _loader(n: int = 24, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


class Regression(Trainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model(x), y), "acc": 0.99}

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self.train_step(batch)


class DummyTrainer(Regression):
    """zae-engine's test_web_logger trainer: a fixed signature, no **kwargs."""

    def __init__(self, model: nn.Module, optimizer: Any = None, scheduler: Any = None, mode: str = "train") -> None:
        super().__init__(model, torch.device("cpu"), mode, optimizer, scheduler, log_bar=False, handle_signals=False)


def _parts(scheduler: bool = True) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if scheduler else None


def test_fixed_constructor_with_save_path_and_web_logger_routed_to_the_add_ons(tmp_path: Path) -> None:
    model, opt, sched = _parts()
    built = DummyTrainer.add_on(StateManagerAddon, WandBLoggerAddon)
    trainer = built(model, opt, sched, save_path=str(tmp_path / "ckpt"),
                    web_logger={"wandb": {"project": "compat", "dir": str(tmp_path)}})
    assert trainer.save_path == str(tmp_path / "ckpt") and trainer.save_format == "ckpt"
    assert trainer.web_logger["wandb"].is_live()
    trainer.web_logger["wandb"].finish()
    assert not trainer.web_logger["wandb"].is_live()


def test_state_manager_writes_zae_engines_layout_at_improving_epochs_and_loads_it_back(tmp_path: Path) -> None:
    model, opt, sched = _parts()
    save = tmp_path / "ckpt"
    trainer = DummyTrainer.add_on(StateManagerAddon)(model, opt, sched, save_path=str(save))
    trainer.run(2, _loader(), _loader(16, seed=1))
    assert sorted(os.listdir(save)) == ["model.ckpt", "optimizer.zae", "scheduler.zae"]
    best_epoch = trainer.weight_buffer["epoch"][-1]
    saved = torch.load(save / "model.ckpt", weights_only=True)
    assert torch.equal(saved["weight"], trainer.weight_buffer["weight"][-1]["weight"]), best_epoch
    with open(save / "scheduler.zae", "rb") as f:  # zae-engine's own load_state reads it with pickle
        assert pickle.load(f)["last_epoch"] == 1 + best_epoch

    trainer.save_state()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh_model, fresh_opt, fresh_sched = _parts()
    other = DummyTrainer.add_on(StateManagerAddon)(fresh_model, fresh_opt, fresh_sched, save_path=str(save))
    other.load_state()
    assert all(torch.equal(fresh_model.state_dict()[k], v) for k, v in expected.items())
    assert fresh_sched.last_epoch == 2
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_state_manager_with_safetensors_and_no_scheduler(tmp_path: Path) -> None:
    model, opt, _ = _parts(scheduler=False)
    trainer = DummyTrainer.add_on(StateManagerAddon)(model, opt, None, save_path=str(tmp_path), save_format="safetensor")
    trainer.run(1, _loader())
    trainer.save_state()
    assert sorted(os.listdir(tmp_path)) == ["model.safetensor", "optimizer.zae"]  # scheduler=None: no file
    with pytest.raises(CheckpointNotFoundError, match="holds no zae-engine state"):
        trainer.load_state(str(tmp_path / "empty"))


def test_core_state_manager_resumes_from_a_folder_the_compat_layer_wrote(tmp_path: Path) -> None:
    from core_helpers import TinyTrainer
    from zae_trainer.addons import StateManagerAddon as CoreStateManager

    model, opt, sched = _parts()
    DummyTrainer.add_on(StateManagerAddon)(model, opt, sched, save_path=str(tmp_path)).save_state()
    torch.manual_seed(5)
    core_model = nn.Linear(4, 1)
    core_opt = torch.optim.Adam(core_model.parameters(), lr=0.05)
    core = TinyTrainer.add_on(CoreStateManager)(core_model, "cpu", "train", core_opt, None, log_bar=False,
                                                  handle_signals=False, save_path=str(tmp_path))
    with pytest.warns(RuntimeWarning, match="scheduler state but the trainer has no scheduler"):
        with pytest.warns(RuntimeWarning, match="zae-engine folders record no progress"):
            core.load_state()
    assert torch.equal(core_model.weight, model.weight)


def test_both_web_loggers_receive_web_logger_and_log_every_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(tmp_path / "neptune"))
    model, opt, sched = _parts()
    web_logger = {
        "wandb": {"project": "compat", "dir": str(tmp_path)},
        "neptune": {"project_name": "ws/compat", "api_tkn": "not-a-real-token", "mode": "offline"},
    }
    given = {k: dict(v) for k, v in web_logger.items()}
    trainer = DummyTrainer.add_on(WandBLoggerAddon, NeptuneLoggerAddon)(model, opt, sched, web_logger=web_logger)
    assert web_logger == given  # zae-engine popped project_name / api_tkn out of the caller's dict
    assert trainer.web_logger["wandb"].is_live() and trainer.web_logger["neptune"].is_live()
    trainer.run(1, _loader(24), _loader(16, seed=1))
    losses = [float(v) for v in trainer.log_train["loss"]] + [float(v) for v in trainer.log_test["loss"]]
    run_id = trainer.web_logger["wandb"].id
    trainer.web_logger["wandb"].finish()
    trainer.web_logger["neptune"].stop()
    assert not trainer.web_logger["neptune"].is_live()

    rows = read_wandb_run(wandb_run_file(tmp_path, run_id)).series("loss")
    assert [v for _, v in rows] == pytest.approx(losses)  # 3 training + 2 validation batches, in order
    [folder] = offline_run_folders(tmp_path / "neptune")
    series = read_offline_run(folder)["series"]
    assert [v for _, v in series["loss"]] == pytest.approx(losses)
    assert [v for _, v in series["acc"]] == [0.99] * 5


def test_web_logger_without_a_key_leaves_that_logger_off_and_a_failing_call_only_warns(tmp_path: Path) -> None:
    model, opt, sched = _parts()
    trainer = DummyTrainer.add_on(WandBLoggerAddon)(model, opt, sched, web_logger={"neptune": {}})
    assert trainer.web_logger == {}
    trainer.run(1, _loader())  # nothing to log to: runs as without the add-on
    model, opt, sched = _parts()
    trainer = DummyTrainer.add_on(WandBLoggerAddon)(model, opt, sched,
                                                     web_logger={"wandb": {"project": "c", "dir": str(tmp_path)}})
    trainer.web_logger["wandb"].finish()  # logging into a finished run raises inside W&B
    with pytest.warns(RuntimeWarning, match="logging failed .* training continues"):
        trainer.run(1, _loader())
    assert len(trainer.log_train["loss"]) == 3


def test_the_run_is_finished_when_the_trainer_is_deleted(tmp_path: Path) -> None:
    model, opt, sched = _parts()
    trainer = DummyTrainer.add_on(WandBLoggerAddon)(model, opt, sched,
                                                     web_logger={"wandb": {"project": "c", "dir": str(tmp_path)}})
    run = trainer.web_logger["wandb"]
    gc.disable()  # freed by reference counting alone: nothing in the trainer forms a cycle
    try:
        del trainer
        assert not run.is_live()
    finally:
        gc.enable()


def test_the_core_state_manager_works_on_a_compat_trainer(tmp_path: Path) -> None:
    from zae_trainer.addons import StateManagerAddon as CoreStateManager

    model, opt, sched = _parts()
    trainer = DummyTrainer.add_on(CoreStateManager)(model, opt, sched, save_path=str(tmp_path))
    trainer.run(2, _loader(), _loader(16, seed=1))
    best = trainer.weight_buffer["weight"][-1]  # check_better's copy and the best checkpoint agree
    with torch.no_grad():
        model.weight.zero_()
    trainer.apply_weights("best")
    assert torch.equal(model.weight, best["weight"])
    assert trainer.best["epoch"] == 1 + trainer.weight_buffer["epoch"][-1]
