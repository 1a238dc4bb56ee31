"""trainer.test() results in W&B, Neptune and MLflow, read back from what the real clients wrote.

Most cases test after ``run()`` has closed the backend's run, twice (best weights, then the last
ones), so the logger must reopen the same run, and a later call must neither clobber the
earlier one where the backend keeps history nor leave it half-visible where it keeps one value.
Others: a failed run reopened (its failed mark stays), test() before any run() (a run is made
for it), test() inside run() (the open run), and a store that refuses the write (one warning).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest

from logging_helpers import QUIET, FailsAtStep3
from zae_trainer.addons import StateManagerAddon
from zae_trainer.addons._logging_common import LoggingBackendWarning
from zae_trainer.testing import TinyRegressionTrainer, tiny_loader, tiny_trainer

pytestmark = pytest.mark.timeout(120)


def train_then_test_twice(root: Path, logger: Any, cls: type = TinyRegressionTrainer) -> dict[str, Any]:
    """Two epochs, then test(best) and test(last). "best" = highest valid/loss, which is epoch 1
    (the loss falls), so the two calls evaluate different weights and give different values."""
    built = cls.add_on(logger, StateManagerAddon(save_path=root / "ckpt", keep_top_k=1))
    trainer = tiny_trainer(built, monitor="valid/loss", monitor_mode="max")
    valid = tiny_loader(16, seed=7)
    trainer.run(2, tiny_loader(), valid)
    best = trainer.test(valid, weights="best")
    last = trainer.test(valid, weights="last")
    assert best["test/loss"] != pytest.approx(last["test/loss"])  # the premise
    checkpoint = os.path.join(root / "ckpt", trainer.get_addon("state_manager")._manifest_now().best().name)
    return {"trainer": trainer, "best": best, "last": last, "checkpoint": os.path.abspath(checkpoint),
            "step": trainer.progress_checker.step}


class FailsInTraining(FailsAtStep3):
    """Raises at the third training step; evaluates as the tiny trainer does."""

    def test_step(self, batch: Any) -> dict[str, Any]:
        return TinyRegressionTrainer.train_step(self, batch)


# ======================================================================================
# W&B
# ======================================================================================
def test_wandb_resumes_the_finished_run_for_test_results_summary_holds_the_latest(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    from logging_readers import read_wandb_run, wandb_run_files
    from zae_trainer.addons.wandb_logger import WandBLoggerAddon

    done = train_then_test_twice(tmp_path, WandBLoggerAddon(project="zt-tests", mode="offline", dir=str(tmp_path)))
    run_id = done["trainer"].get_addon("wandb_logger").run_id
    training, *tests = [read_wandb_run(f) for f in wandb_run_files(tmp_path, run_id)]
    # the same run id, resumed twice; offline, each process writes its own file, which `wandb sync` merges in order
    assert len(tests) == 2 and all(t.run_id == run_id for t in tests)
    assert not any(k.startswith("test/") for k in training.keys() | set(training.summary))
    step = done["step"]
    for log, metrics, weights, checkpoint in ((tests[0], done["best"], "best", done["checkpoint"]),
                                              (tests[1], done["last"], "last", "")):
        # one history row per call at the trainer's step, and the call's results in the summary
        assert log.axis("test/loss") == "trainer/step"
        assert log.series("test/loss") == [(step, metrics["test/loss"])]
        assert log.summary["test/loss"] == metrics["test/loss"] and log.summary["test/mae"] == metrics["test/mae"]
        assert (log.summary["test/weights"], log.summary["test/checkpoint"]) == (weights, checkpoint)
        assert log.exit_code == 0  # finished again as training ended: successfully


def test_wandb_reopened_failed_run_keeps_its_failed_exit_code(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    from logging_readers import read_wandb_run, wandb_run_files
    from zae_trainer.addons.wandb_logger import WandBLoggerAddon

    built = FailsInTraining.add_on(WandBLoggerAddon(mode="offline", dir=str(tmp_path)))
    trainer = tiny_trainer(built)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run(1, tiny_loader())
    metrics = trainer.test(tiny_loader(16, seed=7))
    training, test = [read_wandb_run(f) for f in wandb_run_files(tmp_path, trainer.get_addon("wandb_logger").run_id)]
    assert training.exit_code == test.exit_code == 1
    assert test.summary["test/loss"] == metrics["test/loss"] and test.summary["test/weights"] == "current"
    assert test.series("test/loss") == [(2, metrics["test/loss"])]


# ======================================================================================
# Neptune
# ======================================================================================
def test_neptune_assigns_single_values_in_the_same_run_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("neptune")
    from zae_trainer.addons.neptune_logger import (
        RUN_KEY_FIELD,
        NeptuneLoggerAddon,
        offline_run_folders,
        read_offline_run,
    )

    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(tmp_path / "neptune"))
    done = train_then_test_twice(tmp_path, NeptuneLoggerAddon(mode="offline", **QUIET))
    addon = done["trainer"].get_addon("neptune_logger")
    training, *tests = [read_offline_run(f) for f in offline_run_folders(tmp_path / "neptune")]
    assert len(tests) == 2
    assert {r["fields"][RUN_KEY_FIELD] for r in (training, *tests)} == {addon.custom_run_id}  # one run
    assert not any(k.startswith("test/") for k in [*training["fields"], *training["series"]])
    for data, metrics, weights, checkpoint in ((tests[0], done["best"], "best", done["checkpoint"]),
                                               (tests[1], done["last"], "last", "")):
        assert data["series"] == {}  # assigned, never appended
        test_fields = {k: v for k, v in data["fields"].items() if k.startswith("test/")}
        assert test_fields == {"test/loss": metrics["test/loss"], "test/mae": metrics["test/mae"],
                               "test/step": done["step"], "test/weights": weights, "test/checkpoint": checkpoint}
    # what the server holds after `neptune sync` of the folders in order: the latest call
    merged: dict[str, Any] = {}
    for data in (training, *tests):
        merged.update(data["fields"])
    assert merged["test/loss"] == done["last"]["test/loss"] and merged["summary/status"] == "finished"


# ======================================================================================
# MLflow
# ======================================================================================
@pytest.fixture
def file_store(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading MLflow 3's file store back


@pytest.mark.usefixtures("file_store")
def test_mlflow_logs_test_metrics_at_the_step_into_the_finished_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from zae_trainer.addons.mlflow_logger import MLflowLoggerAddon

    done = train_then_test_twice(tmp_path, MLflowLoggerAddon(tracking_uri=str(tmp_path / "mlruns")))
    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    [run] = client.search_runs(["0"])
    assert run.info.run_id == done["trainer"].get_addon("mlflow_logger").run_id
    history = sorted(client.get_metric_history(run.info.run_id, "test/loss"), key=lambda m: m.timestamp)
    assert [(m.step, m.value) for m in history] == [(done["step"], done["best"]["test/loss"]),
                                                    (done["step"], done["last"]["test/loss"])]
    assert history[0].timestamp < history[1].timestamp  # the later call is the run's value
    assert run.data.metrics["test/loss"] == done["last"]["test/loss"]
    assert run.data.metrics["test/mae"] == done["last"]["test/mae"]
    assert (run.data.tags["test/weights"], run.data.tags["test/checkpoint"]) == ("last", "")
    assert run.info.status == "FINISHED"
    assert run.info.end_time <= history[0].timestamp  # training's end time, not moved by test()


@pytest.mark.usefixtures("file_store")
def test_mlflow_test_before_any_run_creates_a_run_and_a_failing_store_only_warns(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from zae_trainer.addons.mlflow_logger import MLflowLoggerAddon

    store = tmp_path / "mlruns"
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(MLflowLoggerAddon(tracking_uri=str(store))),
                           config={"lr": 0.05})
    metrics = trainer.test(tiny_loader(16, seed=7))
    client = MlflowClient(f"file:{store}")
    run = client.get_run(trainer.get_addon("mlflow_logger").run_id)
    assert run.data.metrics["test/loss"] == metrics["test/loss"] and run.data.params["lr"] == "0.05"
    assert run.data.tags["test/weights"] == "current" and run.info.status == "FINISHED"

    client.delete_run(run.info.run_id)  # the store now refuses writes to it: a real backend error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = trainer.test(tiny_loader(16, seed=7))
    assert again == metrics  # test() is unharmed
    [warning] = [w for w in caught if issubclass(w.category, LoggingBackendWarning)]
    assert "MLflow logging failed to record test results" in str(warning.message)


@pytest.mark.usefixtures("file_store")
def test_mlflow_test_called_inside_run_goes_into_the_open_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from zae_trainer import AddOn
    from zae_trainer.addons.mlflow_logger import MLflowLoggerAddon

    class TestsEachEpoch(AddOn):
        """Calls trainer.test() while run() is in progress; order 200: after the logger's EPOCH_END."""

        name = "tests_each_epoch"
        order = 200

        def __init__(self) -> None:
            self.results: list[tuple[int, float]] = []

        def on_epoch_end(self, trainer: Any) -> None:
            metrics = trainer.test(tiny_loader(16, seed=7))
            self.results.append((trainer.progress_checker.step, metrics["test/loss"]))

    store = tmp_path / "mlruns"
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(MLflowLoggerAddon(tracking_uri=str(store)), TestsEachEpoch))
    trainer.run(2, tiny_loader())
    client = MlflowClient(f"file:{store}")
    [run] = client.search_runs(["0"])  # no second run was opened
    history = sorted(client.get_metric_history(run.info.run_id, "test/loss"), key=lambda m: m.timestamp)
    assert [(m.step, m.value) for m in history] == trainer.get_addon(TestsEachEpoch).results
    assert [m.step for m in history] == [6, 12] and run.info.status == "FINISHED"
