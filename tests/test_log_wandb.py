"""WandBLoggerAddon with the real wandb client, offline: read the .wandb run log back and compare.

W&B starts slowly (a background service), so one module-scoped run is checked several ways.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("wandb")

from logging_helpers import FailsAtStep3, MetricTap, SigintsItselfAtStep3, SignalsItselfAtStep3  # noqa: E402
from logging_readers import read_wandb_run, wandb_run_file  # noqa: E402
from zae_trainer.addons import StateManagerAddon  # noqa: E402
from zae_trainer.errors import TrainingTerminated  # noqa: E402
from zae_trainer.addons.wandb_logger import WandBLoggerAddon  # noqa: E402
from zae_trainer.testing import TinyRegressionTrainer, tiny_loader, tiny_trainer  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("wandb")
    wandb_addon = WandBLoggerAddon(project="zt-tests", mode="offline", dir=str(root), upload_best_checkpoint=True,
                                   tags=["unit"])
    cls = TinyRegressionTrainer.add_on(wandb_addon, StateManagerAddon(save_path=root / "ckpt"), MetricTap)
    trainer = tiny_trainer(cls, config={"lr": 0.05, "batch_size": 8})
    trainer.run(2, tiny_loader(), tiny_loader(16, seed=7))
    addon = trainer.get_addon("wandb_logger")
    return {"root": root, "trainer": trainer, "tap": trainer.get_addon(MetricTap), "addon": addon,
            "log": read_wandb_run(wandb_run_file(root, addon.run_id))}


def test_step_and_epoch_metrics_arrive_with_exact_names_values_and_declared_axes(first_run: dict[str, Any]) -> None:
    log, tap = first_run["log"], first_run["tap"]
    assert log.run_id == first_run["addon"].run_id
    assert log.steps() == [2, 4, 6, 8, 10, 12]
    for key in ("train/loss", "train/mae", "lr"):
        assert log.axis(key) == "trainer/step", key
        assert log.series(key) == tap.expected_series(key), key
    for key in ("epoch/train/loss", "epoch/valid/loss", "epoch/valid/mae"):
        assert log.axis(key) == "epoch/index", key
        assert log.series(key) == tap.expected_epoch_series(key), key
    assert log.axis("epoch/index") == "trainer/step"
    assert log.series("epoch/index") == [(6, 1), (12, 2)]
    assert log.glob_axes == {"*": "trainer/step"}  # the add-on's own run: the user's rows follow the step too
    assert all("_step" in row for row in log.rows) and [r["_step"] for r in log.rows] == sorted(
        r["_step"] for r in log.rows)  # no explicit step=: W&B's own counter only grows
    keys = {"train/loss", "train/mae", "lr", "epoch/index", "epoch/train/loss", "epoch/train/mae", "epoch/valid/loss",
            "epoch/valid/mae", "trainer/step"}
    assert log.keys() == keys  # nothing else, nothing renamed


def test_config_holds_the_run_configuration_without_secrets(first_run: dict[str, Any]) -> None:
    config = first_run["log"].config
    assert config["lr"] == 0.05 and config["batch_size"] == 8
    ours = config["zae_trainer"]
    assert ours["optimizer"]["class"] == "SGD" and ours["optimizer"]["lr"] == 0.05
    assert ours["trainer"]["log_every_n_steps"] == 2 and ours["model"]["parameters"] == 4
    assert ours["addons"]["wandb_logger"]["project"] == "zt-tests"


def test_summary_exit_code_and_best_checkpoint_artifact(first_run: dict[str, Any]) -> None:
    log, trainer = first_run["log"], first_run["trainer"]
    summary = log.summary
    assert (summary["status"], summary["epochs"], summary["steps"], summary["samples"]) == ("finished", 2, 12, 96)
    assert summary["seconds"] == summary["process_seconds"] == trainer.summary.seconds  # a fresh run: one process
    assert summary["best/metric"] == "valid/loss"
    assert (summary["best/value"], summary["best/epoch"]) == (trainer.best["value"], trainer.best["epoch"])
    assert log.exit_code == 0
    best_file = trainer.get_addon(StateManagerAddon)._manifest_now().best().name
    [artifact] = log.artifacts
    assert (artifact["name"], artifact["type"], artifact["files"]) == (f"model-{log.run_id}", "model", [best_file])
    assert sorted(artifact["aliases"]) == ["best", "latest"]


def test_a_resumed_training_continues_the_same_run_on_the_same_step_axis(first_run: dict[str, Any]) -> None:
    root = first_run["root"]
    cls = TinyRegressionTrainer.add_on(
        WandBLoggerAddon(mode="offline", dir=str(root), resume_run=True),
        StateManagerAddon(save_path=root / "ckpt", resume="latest"),
        MetricTap,
    )
    trainer = tiny_trainer(cls)
    trainer.run(3, tiny_loader(), tiny_loader(16, seed=7))  # 3 in all: one more epoch
    addon = trainer.get_addon("wandb_logger")
    assert addon.run_id == first_run["addon"].run_id
    newest = read_wandb_run(wandb_run_file(root, addon.run_id))
    assert newest.steps() == [14, 16, 18]
    assert newest.series("train/loss") == trainer.get_addon(MetricTap).expected_series("train/loss")
    assert newest.series("epoch/index") == [(18, 3)]
    assert newest.series("epoch/valid/loss") == [(3, trainer.epoch_metrics["valid/loss"])]


def test_a_run_that_raises_is_marked_failed(tmp_path: Path) -> None:
    cls = FailsAtStep3.add_on(WandBLoggerAddon(mode="offline", dir=str(tmp_path)))
    trainer = tiny_trainer(cls)
    with pytest.raises(RuntimeError, match="boom at step 3"):
        trainer.run(1, tiny_loader())
    log = read_wandb_run(wandb_run_file(tmp_path, trainer.get_addon("wandb").run_id))
    assert log.exit_code == 1
    assert log.steps() == [2] and log.summary["status"] == "failed"


def test_settings_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown backend.*'comet'"):
        WandBLoggerAddon(web_logger={"comet": {}})
    with pytest.raises(TypeError, match="must be a dict"):
        WandBLoggerAddon(web_logger="wandb")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init_timeout"):
        WandBLoggerAddon(init_timeout=0)
    assert os.environ["WANDB_MODE"] == "offline"  # the conftest keeps W&B off the network


# ======================================================================================
# The run is the user's to use, and the user's to keep
# ======================================================================================
class LogsItsOwnRows(TinyRegressionTrainer):
    """Calls ``wandb.log`` inside ``train_step``, as users do for images and tables."""

    seen_runs: list[Any] = []

    def train_step(self, batch: Any) -> dict[str, Any]:
        import wandb

        if self.progress_checker.step == 3:
            wandb.log({"user/value": 42.0})
            self.get_addon("wandb_logger").run.log({"user/other": 7.0})
            self.seen_runs.append((wandb.run, self.get_addon("wandb_logger").run))
        return super().train_step(batch)


def test_the_users_own_wandb_log_lands_in_the_run_on_the_trainers_step(tmp_path: Path) -> None:
    import wandb

    trainer = tiny_trainer(LogsItsOwnRows.add_on(WandBLoggerAddon(mode="offline", dir=str(tmp_path))))
    trainer.run(1, tiny_loader())
    global_run, addon_run = LogsItsOwnRows.seen_runs[-1]
    assert global_run is addon_run and addon_run is not None  # the add-on's run is the global one
    addon = trainer.get_addon("wandb_logger")
    assert addon.run is None and wandb.run is None  # finished and released at RUN_END
    log = read_wandb_run(wandb_run_file(tmp_path, addon.run_id))
    # logged during step 4, after the step-2 log point: W&B's step_sync puts them on trainer/step 2
    assert log.series("user/value") == [(2, 42.0)] and log.series("user/other") == [(2, 7.0)]
    assert log.steps() == [2, 4, 6] and log.exit_code == 0


def test_a_run_the_user_started_is_used_and_left_open(tmp_path: Path) -> None:
    import wandb

    user_run = wandb.init(project="zt-user", mode="offline", dir=str(tmp_path), config={"lr": 0.5})
    try:
        trainer = tiny_trainer(TinyRegressionTrainer.add_on(WandBLoggerAddon(project="ignored")), config={"lr": 0.05})
        trainer.run(1, tiny_loader())
        addon = trainer.get_addon("wandb_logger")
        assert addon.run_id == user_run.id and not addon.owns_run
        assert wandb.run is user_run  # not finished, still the user's
        user_run.log({"user/after": 1.0})
    finally:
        user_run.finish()
    found = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(found) == 1, found  # one run, not two
    path = found[0]
    log = read_wandb_run(path)
    assert log.steps() == [2, 4, 6] and log.series("user/after")
    assert log.config["lr"] == 0.5  # the user's value is kept; ours are added beside it
    assert log.config["zae_trainer"]["optimizer"]["lr"] == 0.05
    assert log.exit_code == 0 and log.glob_axes == {}  # the user's run keeps the user's axes


@pytest.mark.parametrize("cls, code", [(SignalsItselfAtStep3, 143), (SigintsItselfAtStep3, 130)])
def test_an_interrupted_run_finishes_with_the_signals_exit_code(tmp_path: Path, cls: type, code: int) -> None:
    trainer = tiny_trainer(cls.add_on(WandBLoggerAddon(mode="offline", dir=str(tmp_path))), handle_signals=True)
    with pytest.raises((KeyboardInterrupt, TrainingTerminated)):
        trainer.run(1, tiny_loader())
    log = read_wandb_run(wandb_run_file(tmp_path, trainer.get_addon("wandb_logger").run_id))
    assert log.exit_code == code and log.summary["status"] == "interrupted"
    assert log.steps() == [2]
