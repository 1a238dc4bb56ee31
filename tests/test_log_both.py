"""W&B, Neptune and the local logger in one trainer, configured the zae-engine way.

zae-engine's two web add-ons both popped ``web_logger``, so with both installed W&B never
started. Here the setting reaches both, and all three loggers record the same numbers,
including what the gradient-clipping and throughput add-ons put into the log metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("wandb")
pytest.importorskip("neptune")

from logging_helpers import QUIET, MetricTap  # noqa: E402
from logging_readers import read_wandb_run, wandb_run_file  # noqa: E402
from zae_trainer.addons import GradientClippingAddon, ThroughputMonitorAddon  # noqa: E402
from zae_trainer.addons.local_logger import LocalLoggerAddon, read_jsonl  # noqa: E402
from zae_trainer.addons.neptune_logger import NeptuneLoggerAddon, offline_run_folders, read_offline_run  # noqa: E402
from zae_trainer.addons.wandb_logger import WandBLoggerAddon  # noqa: E402
from zae_trainer.testing import TinyRegressionTrainer, tiny_loader, tiny_trainer  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def test_one_web_logger_setting_starts_both_and_every_logger_records_the_same_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(tmp_path / "neptune"))
    cls = TinyRegressionTrainer.add_on(
        NeptuneLoggerAddon, WandBLoggerAddon, LocalLoggerAddon, MetricTap,
        GradientClippingAddon(max_norm=10.0), ThroughputMonitorAddon,
    )
    web_logger = {
        "wandb": {"project": "zt-both", "mode": "offline", "dir": str(tmp_path)},
        "neptune": {"project": "ws/zt-both", "mode": "offline", **QUIET},
    }
    trainer = tiny_trainer(cls, web_logger=web_logger, log_dir=tmp_path / "logs", plot=False, tensorboard=False)
    trainer.run(1, tiny_loader(), tiny_loader(16, seed=7))
    tap = trainer.get_addon(MetricTap)

    keys = ["train/loss", "train/grad_norm", "throughput/samples_per_sec", "throughput/step_time", "lr"]
    assert all(key in tap.steps[0][1] for key in keys)  # the other add-ons did put their values in
    wandb_log = read_wandb_run(wandb_run_file(tmp_path, trainer.get_addon("wandb").run_id))
    [folder] = offline_run_folders(tmp_path / "neptune")
    neptune_series = read_offline_run(folder)["series"]
    local = [r for r in read_jsonl(tmp_path / "logs" / "metrics.jsonl") if r["kind"] == "step"]
    for key in keys:
        expected = tap.expected_series(key)
        assert [step for step, _ in expected] == [2, 4, 6]
        assert wandb_log.series(key) == expected, key
        assert neptune_series[key] == expected, key
        assert [(r["step"], r[key]) for r in local] == expected, key
    assert neptune_series["epoch/valid/loss"] == [(6, trainer.epoch_metrics["valid/loss"])]
    assert wandb_log.series("epoch/valid/loss") == [(1, trainer.epoch_metrics["valid/loss"])]  # against the epoch


def test_a_web_logger_setting_for_one_backend_leaves_the_other_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(tmp_path / "neptune"))
    cls = TinyRegressionTrainer.add_on(WandBLoggerAddon, NeptuneLoggerAddon)
    trainer = tiny_trainer(cls, web_logger={"neptune": {"mode": "offline", **QUIET}})
    trainer.run(1, tiny_loader())
    assert trainer.get_addon("wandb").run_id is None  # zae-engine semantics: no "wandb" key, no W&B run
    assert len(offline_run_folders(tmp_path / "neptune")) == 1


def test_configured_instances_and_argument_order_do_not_matter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(tmp_path / "neptune"))
    results: list[Any] = []
    for order in ((0, 1), (1, 0)):
        addons = [WandBLoggerAddon(mode="offline", dir=str(tmp_path / f"w{order[0]}")),
                  NeptuneLoggerAddon(mode="offline", **QUIET)]
        trainer = tiny_trainer(TinyRegressionTrainer.add_on(*(addons[i] for i in order)))
        trainer.run(1, tiny_loader())
        log = read_wandb_run(wandb_run_file(tmp_path / f"w{order[0]}", trainer.get_addon("wandb").run_id))
        results.append(log.series("train/loss"))
    assert results[0] == results[1] and len(results[0]) == 3
    assert len(offline_run_folders(tmp_path / "neptune")) == 2
