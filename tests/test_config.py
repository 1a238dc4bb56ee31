"""from_config: objects built from names, errors that name the key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from zae_trainer import SupervisedTrainer, from_config
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
    trainer = from_config(
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
    trainer = from_config(
        {"model": model, "optimizer": "Adam", "loss": {"name": "MSELoss"}, "trainer": {"device": "cpu"}}, TinyTrainer
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
    trainer = fit(path, base_dir=REPO / "examples")  # its import paths are relative to the original's folder
    assert trainer.progress_checker.epoch == 3
    assert trainer.epoch_metrics["valid/acc"] > 0.85  # 3 epochs of AdamW on digits
    assert trainer.best["metric"] == "valid/acc"
    train, valid = build_data(path, base_dir=REPO / "examples")
    assert train.batch_size == 32 and valid is not None


@pytest.mark.parametrize(
    ("changes", "path", "words"),
    [
        ({"optimiser": {"name": "SGD"}}, "optimiser", "did you mean 'optimizer'"),
        ({"optimizer": {"name": "Adamm", "lr": 0.1}}, "optimizer.name", "Did you mean 'Adam'"),
        ({"optimizer": {"lr": 0.1}}, "optimizer.name", "missing"),
        ({"optimizer": {"name": "SGD", "learning_rate": 0.1}}, "optimizer.learning_rate", "has no setting"),
        ({"optimizer": {"name": "SGD", "lrr": 0.1}}, "optimizer.lrr", "Did you mean 'lr'?"),
        ({"scheduler": {"name": "StepLR"}}, "scheduler", "step_size"),
        ({"loss": {"name": "Linear"}}, "loss.name", "not a loss"),
        ({"loss": {"name": "bce", "label_smoothing": 2.0}}, "loss", "label_smoothing must be in"),
        ({"addons": ["no_such_addon"]}, "addons[0]", "no_such_addon"),
        ({"addons": [{"name": "state_manager", "save_pth": "x"}]}, "addons[0].save_pth", "Did you mean 'save_path'?"),
        ({"model": "examples.digits_factories:make_modle"}, "model", "has no attribute"),
        ({"model": "no_such_package.models:Net"}, "model", "cannot import"),
        ({"model_args": {"width": 3}}, "model_args.width", "has no setting 'width'"),
        ({"model": None}, "model", "missing"),
        ({"trainer": {"device": "cpu", "log_every_n_step": 5}}, "trainer.log_every_n_step", "log_every_n_steps"),
        ({"trainer": {"device": "cpu", "log_every_n_steps": "ten"}}, "trainer.log_every_n_steps", "'ten'"),
        ({"trainer": {"device": "cpu", "monitor_mode": "maximum"}}, "trainer.monitor_mode", "'max'"),
        ({"scheduler": {"name": "StepLR", "step_size": 2, "gama": 0.5}}, "scheduler.gama", "Did you mean 'gamma'?"),
    ],
)
def test_invalid_configs_name_the_key_path(changes: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_config(base_config(**changes))
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
    from_config(config)
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
    trainer = from_config(base_config(addons=[{"name": "wandb", "project": "digits", "mode": "offline"}]))
    addon = trainer.get_addon("wandb")
    assert addon.init_kwargs == {"project": "digits", "mode": "offline"}  # what wandb.init will get


def test_yaml_and_overrides_read_exponent_numbers_as_floats(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: examples.digits_factories:make_model\n"
        "optimizer: {name: AdamW, lr: 3e-3, weight_decay: 1e-4, eps: 1.0e-8}\n"
        "trainer: {device: cpu, log_bar: false}\n"
    )
    config = load_config(path)
    assert config["optimizer"] == {"name": "AdamW", "lr": 0.003, "weight_decay": 0.0001, "eps": 1e-8}
    apply_overrides(config, ["optimizer.lr=5e-4", "optimizer.betas=[0.9, 9.99e-1]", "model_args.hidden=1_6"])
    assert config["optimizer"]["lr"] == 5e-4 and isinstance(config["optimizer"]["lr"], float)
    assert config["optimizer"]["betas"] == [0.9, 0.999] and config["model_args"]["hidden"] == 16
    trainer = from_config(config)
    assert trainer.optimizer.param_groups[0]["lr"] == 5e-4
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    # words that only look numeric stay strings
    apply_overrides(config, ["config.tag=1e", "config.run=e3"])
    assert config["config"] == {"tag": "1e", "run": "e3"}


def test_a_misspelt_optimizer_setting_suggests_the_name_and_lists_valid_ones_as_valid() -> None:
    with pytest.raises(ConfigError) as info:
        from_config(base_config(optimizer={"name": "AdamW", "lrr": 0.1, "weight_decay": 0.01}))
    message = str(info.value)
    assert info.value.path == "optimizer.lrr"
    assert "AdamW has no setting 'lrr'. Did you mean 'lr'?" in message
    valid = message.split("Valid settings: ", 1)[1]
    assert "'lr'" in valid and "'weight_decay'" in valid and "'params'" not in valid
    assert "weight_decay" not in message.split("Valid settings")[0]  # a valid key is never called rejected


def test_import_paths_resolve_beside_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "project"
    (folder / "nets").mkdir(parents=True)
    (folder / "beside_config_models.py").write_text(
        "from torch import nn\n\ndef make(width=4):\n    return nn.Linear(3, width)\n"
    )
    (folder / "nets" / "tiny_net_file.py").write_text(
        "from torch import nn\n\nclass Net(nn.Sequential):\n    def __init__(self):\n"
        "        super().__init__(nn.Linear(3, 2))\n"
    )
    (folder / "a.yaml").write_text(
        "model: beside_config_models:make\nmodel_args: {width: 5}\noptimizer: SGD\nscheduler: null\n"
        "trainer: {device: cpu, log_bar: false}\n"
    )
    (folder / "b.yaml").write_text("model: nets/tiny_net_file.py:Net\noptimizer: {name: SGD, lr: 0.1}\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    # a dict has no folder: the module is not found, and the error says where it looked
    with pytest.raises(ConfigError, match=r"config\.model: cannot import module 'beside_config_models'"):
        from_config(load_config(folder / "a.yaml"))
    trainer = from_config(folder / "a.yaml")  # a file: its folder is searched
    assert trainer.model.out_features == 5
    trainer = from_config(folder / "b.yaml")  # a .py path relative to the config
    assert type(trainer.model).__name__ == "Net"
    with pytest.raises(ConfigError, match=r"config\.model: .*no file"):
        from_config(dict(base_config(), model="nets/missing.py:Net"))


def test_errors_inside_the_users_factories_keep_their_type_and_traceback(tmp_path: Path) -> None:
    (tmp_path / "broken_user_factories.py").write_text(
        "def make_model():\n    raise ValueError('shape mismatch in my model')\n\n"
        "def make_data():\n    import this_dependency_is_not_installed_anywhere\n"
    )
    (tmp_path / "c.yaml").write_text("model: broken_user_factories:make_model\noptimizer: SGD\n")
    with pytest.raises(ValueError, match="shape mismatch in my model") as info:
        from_config(tmp_path / "c.yaml")
    assert not isinstance(info.value, ConfigError)
    assert any(entry.name == "make_model" for entry in info.traceback)
    with pytest.raises(ModuleNotFoundError, match="this_dependency_is_not_installed_anywhere"):
        build_data({"data": "broken_user_factories:make_data"}, base_dir=tmp_path)
