"""NeptuneLoggerAddon with the real neptune 1.x client in offline mode: read its disk queue back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("neptune")

from logging_helpers import QUIET, FailsAtStep3, MetricTap, SignalsItselfAtStep3  # noqa: E402
from zae_trainer.addons import StateManagerAddon  # noqa: E402
from zae_trainer.errors import TrainingTerminated  # noqa: E402
from zae_trainer.addons.neptune_logger import NeptuneLoggerAddon, offline_run_folders, read_offline_run  # noqa: E402
from zae_trainer.testing import TinyRegressionTrainer, tiny_loader, tiny_trainer  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def neptune_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(tmp_path / "neptune"))
    return tmp_path / "neptune"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("neptune")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEPTUNE_DATA_DIRECTORY", str(root / "neptune"))
        cls = TinyRegressionTrainer.add_on(NeptuneLoggerAddon, StateManagerAddon(save_path=root / "ckpt"), MetricTap)
        # zae-engine's spelling of the options, passed the zae-engine way
        web_logger = {"neptune": {"project_name": "ws/zt-tests", "api_tkn": "not-a-real-token", "mode": "offline",
                                  **QUIET}}
        trainer = tiny_trainer(cls, config={"lr": 0.05}, web_logger=web_logger, upload_best_checkpoint=True)
        trainer.run(2, tiny_loader(), tiny_loader(16, seed=7))
    [folder] = offline_run_folders(root / "neptune")
    return {"root": root, "trainer": trainer, "tap": trainer.get_addon(MetricTap),
            "addon": trainer.get_addon("neptune"), "data": read_offline_run(folder)}


def test_series_arrive_with_exact_names_values_and_steps(first_run: dict[str, Any]) -> None:
    series, tap = first_run["data"]["series"], first_run["tap"]
    keys = ("train/loss", "train/mae", "lr", "epoch/index", "epoch/train/loss", "epoch/valid/loss", "epoch/valid/mae",
            "epoch/train/mae")
    assert set(series) == set(keys)
    for key in keys:
        assert series[key] == tap.expected_series(key), key
    assert [step for step, _ in series["train/loss"]] == [2, 4, 6, 8, 10, 12]


def test_config_summary_and_checkpoint_fields(first_run: dict[str, Any]) -> None:
    fields, trainer = first_run["data"]["fields"], first_run["trainer"]
    assert fields["config/lr"] == 0.05
    assert fields["config/zae_trainer/optimizer/class"] == "SGD"
    assert fields["config/zae_trainer/addons/neptune_logger/web_logger/neptune/api_tkn"] == "<redacted>"
    assert "not-a-real-token" not in repr(fields)
    assert fields["summary/status"] == "finished" and fields["summary/steps"] == 12
    assert fields["summary/best/value"] == trainer.best["value"] and fields["summary/best/epoch"] == 2
    assert fields["sys/failed"] is False
    best = trainer.get_addon(StateManagerAddon)._manifest_now().best().name
    assert first_run["data"]["files"]["checkpoints/best"].endswith(best)


def test_the_run_id_is_kept_for_resuming(first_run: dict[str, Any], neptune_dir: Path) -> None:
    first = first_run["addon"]
    assert first.state_dict() == {"run_id": first.run_id, "custom_run_id": first.custom_run_id,
                                  "seconds": first_run["trainer"].summary.seconds}
    assert first.custom_run_id and len(first.custom_run_id) == 32
    cls = TinyRegressionTrainer.add_on(
        NeptuneLoggerAddon(mode="offline", resume_run=True, **QUIET),
        StateManagerAddon(save_path=first_run["root"] / "ckpt", resume="latest"),
    )
    trainer = tiny_trainer(cls)
    trainer.run(3, tiny_loader())
    assert trainer.get_addon("neptune").custom_run_id == first.custom_run_id  # offline: the same custom_run_id
    [folder] = offline_run_folders(neptune_dir)
    assert [s for s, _ in read_offline_run(folder)["series"]["train/loss"]] == [14, 16, 18]


def test_a_run_that_raises_is_marked_failed(neptune_dir: Path) -> None:
    trainer = tiny_trainer(FailsAtStep3.add_on(NeptuneLoggerAddon(mode="offline", **QUIET)))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run(1, tiny_loader())
    [folder] = offline_run_folders(neptune_dir)
    data = read_offline_run(folder)
    assert data["fields"]["sys/failed"] is True and data["fields"]["summary/status"] == "failed"
    assert data["series"]["train/loss"][0][0] == 2


def test_web_logger_without_a_neptune_key_leaves_it_off(neptune_dir: Path) -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(NeptuneLoggerAddon), web_logger={"wandb": {}})
    trainer.run(1, tiny_loader())
    assert offline_run_folders(neptune_dir) == []


def test_an_interrupted_run_is_marked_failed_with_its_status(neptune_dir: Path) -> None:
    trainer = tiny_trainer(SignalsItselfAtStep3.add_on(NeptuneLoggerAddon(mode="offline", **QUIET)),
                           handle_signals=True)
    with pytest.raises(TrainingTerminated):  # SIGTERM, handled at the next batch boundary
        trainer.run(1, tiny_loader())
    [folder] = offline_run_folders(neptune_dir)
    fields = read_offline_run(folder)["fields"]
    assert fields["sys/failed"] is True and fields["summary/status"] == "interrupted"
