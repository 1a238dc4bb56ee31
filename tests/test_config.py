"""Trainer.from_config: objects built from names, errors that name the key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from zae_trainer import SupervisedTrainer, Trainer
from zae_trainer.config import ConfigError, apply_overrides, build_data, fit, load_config
from zae_trainer.losses import BinaryCrossEntropyLoss

from core_helpers import TinyTrainer, tiny_loader

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # examples.digits_factories by import path


def base_config(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model": "examples.digits_factories:make_model",
        "model_args": {"hidden": 16, "dropout": 0.0},
        "optimizer": {"name": "SGD", "lr": 0.05, "momentum": 0.9},
        "trainer": {"device": "cpu", "log_bar": False, "handle_signals": False},
    }
    config.update(changes)
    return config


def test_objects_are_built_from_names_with_their_options(tmp_path: Path) -> None:
    trainer = Trainer.from_config(
        base_config(
            scheduler={"name": "StepLR", "step_size": 3, "gamma": 0.5, "step_on_batch": True},
            loss={"name": "bce", "label_smoothing": 0.1},
            addons=[{"name": "state_manager", "save_path": str(tmp_path / "ckpt"), "save_format": "safetensors"}],
        )
    )
    assert type(trainer).__name__ == "SupervisedTrainer[state_manager]"
    assert isinstance(trainer, SupervisedTrainer)
    assert [m.out_features for m in trainer.model if isinstance(m, nn.Linear)] == [16, 10]
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.05 and trainer.optimizer.param_groups[0]["momentum"] == 0.9
    assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.StepLR) and trainer.scheduler.step_size == 3
    assert trainer.scheduler_step_on_batch is True
    assert isinstance(trainer.loss_fn, BinaryCrossEntropyLoss) and trainer.loss_fn.label_smoothing == 0.1
    assert trainer.get_addon("StateManagerAddon").save_format == "safetensors"
    assert trainer.config["optimizer"] == {"name": "SGD", "lr": 0.05, "momentum": 0.9}


def test_torch_losses_and_model_objects_are_accepted() -> None:
    model = nn.Linear(3, 1)
    trainer = TinyTrainer.from_config(
        {"model": model, "optimizer": "Adam", "loss": {"name": "MSELoss"}, "trainer": {"device": "cpu"}}
    )
    assert type(trainer) is TinyTrainer  # a concrete subclass builds itself
    assert trainer.model is model
    assert isinstance(trainer.loss_fn, nn.MSELoss)  # set for subclasses that read it
    assert isinstance(trainer.optimizer, torch.optim.Adam)


def test_a_yaml_file_with_overrides_trains_the_digits_model(tmp_path: Path) -> None:
    config = load_config(REPO / "examples" / "digits.yaml")
    apply_overrides(config, ["run.n_epoch=3", "model_args.hidden=32", "trainer.log_bar=false", "data.batch_size=32"])
    assert config["run"] == {"n_epoch": 3} and config["model_args"]["hidden"] == 32
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    trainer = fit(path)
    assert trainer.progress_checker.epoch == 3
    assert trainer.epoch_metrics["valid/acc"] > 0.85  # 3 epochs of AdamW on digits
    assert trainer.best["metric"] == "valid/acc"
    train, valid = build_data(path)
    assert train.batch_size == 32 and valid is not None


@pytest.mark.parametrize(
    ("changes", "path", "words"),
    [
        ({"optimiser": {"name": "SGD"}}, "optimiser", "did you mean 'optimizer'"),
        ({"optimizer": {"name": "Adamm", "lr": 0.1}}, "optimizer.name", "Did you mean 'Adam'"),
        ({"optimizer": {"lr": 0.1}}, "optimizer.name", "missing"),
        ({"optimizer": {"name": "SGD", "learning_rate": 0.1}}, "optimizer", "does not accept"),
        ({"scheduler": {"name": "StepLR"}}, "scheduler", "step_size"),
        ({"loss": {"name": "Linear"}}, "loss.name", "not a loss"),
        ({"loss": {"name": "bce", "label_smoothing": 2.0}}, "loss", "label_smoothing must be in"),
        ({"addons": ["no_such_addon"]}, "addons[0]", "no_such_addon"),
        ({"addons": [{"name": "state_manager", "save_pth": "x"}]}, "addons[0].save_pth", "save_path"),
        ({"model": "examples.digits_factories:make_modle"}, "model", "has no attribute"),
        ({"model": "no_such_package.models:Net"}, "model", "cannot import"),
        ({"model_args": {"width": 3}}, "model", "does not accept"),
        ({"model": None}, "model", "missing"),
        ({"trainer": {"device": "cpu", "log_every_n_step": 5}}, "trainer", "log_every_n_steps"),
    ],
)
def test_invalid_configs_name_the_key_path(changes: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        Trainer.from_config(base_config(**changes))
    assert info.value.path == path
    assert str(info.value).startswith(f"config.{path}:")
    assert words in str(info.value)


def test_invalid_run_and_data_sections_name_the_key_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.run\.n_epoch"):
        fit(base_config(run={"n_epoch": 0}, data="examples.digits_factories:make_data"))
    with pytest.raises(ConfigError, match=r"config\.run\.epoch_count: unknown key"):
        fit(base_config(run={"n_epoch": 1, "epoch_count": 2}, data="examples.digits_factories:make_data"))
    with pytest.raises(ConfigError, match=r"config\.data: missing"):
        build_data(base_config())
    with pytest.raises(ConfigError, match=r"config\.override: an override must look like"):
        apply_overrides({}, ["override"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_load_config_copies_so_building_never_changes_the_callers_dict() -> None:
    config = base_config()
    before = yaml.safe_dump(config)
    Trainer.from_config(config)
    assert yaml.safe_dump(config) == before


def test_supervised_trainer_reports_accuracy_and_rejects_other_batch_layouts() -> None:
    model = nn.Linear(3, 2)
    trainer = SupervisedTrainer(
        model, "cpu", "train", torch.optim.SGD(model.parameters(), lr=0.1), None, log_bar=False, handle_signals=False
    )
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1])
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean()
    assert torch.equal(trainer.test_step((x, y))["acc"], expected)
    with pytest.raises(Exception, match=r"expects \(inputs, targets\) batches"):
        trainer.train_step((x, y, y))
    loader = tiny_loader()
    assert loader is not None


def test_addons_taking_open_keywords_receive_them_from_a_config() -> None:
    pytest.importorskip("wandb")
    trainer = Trainer.from_config(base_config(addons=[{"name": "wandb", "project": "digits", "mode": "offline"}]))
    addon = trainer.get_addon("wandb")
    assert addon.init_kwargs == {"project": "digits", "mode": "offline"}  # what wandb.init will get
