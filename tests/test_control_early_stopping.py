"""EarlyStoppingAddon: patience, min_delta, thresholds, non-finite values, defaults, resume."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

from zae_trainer import TrainerConfigError
from zae_trainer.addons.early_stopping import EarlyStoppingAddon
from zae_trainer.addons.state_manager import StateManagerAddon
from zae_trainer.testing import TinyRegressionTrainer, check_addon, tiny_loader, tiny_trainer


class Scripted(TinyRegressionTrainer):
    """Reports ``score`` = a scripted value per epoch, so each test chooses the metric's path."""

    scores: Sequence[float] = ()

    def train_step(self, batch: Any) -> dict[str, Any]:
        out = super().train_step(batch)
        out["score"] = torch.tensor(self.scores[self.progress_checker.epoch])
        return out


def _run(scores: Sequence[float], valid: bool = False, trainer_kw: dict[str, Any] | None = None, **settings: Any) -> Any:
    """Train len(scores) epochs with early stopping configured by ``settings``."""
    cls = type("S", (Scripted,), {"scores": [float(torch.tensor(s)) for s in scores]})  # float32 values
    trainer = tiny_trainer(cls.add_on(EarlyStoppingAddon(**settings)), **(trainer_kw or {}))
    trainer.run(len(scores), tiny_loader(16), tiny_loader(8) if valid else None)
    return trainer


def test_stops_after_patience_epochs_without_improvement(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="zae_trainer"):
        trainer = _run([5, 4, 4.5, 4.2, 4.1, 3, 2], monitor="train/score", patience=3)
    assert trainer.progress_checker.epoch == 5  # best 4 at epoch 2; epochs 3, 4, 5 did not improve
    assert trainer.stop_reason is not None and "did not improve on 4 for 3 epoch(s)" in trainer.stop_reason
    assert trainer.summary.status == "stopped" and trainer.summary.stop_reason == trainer.stop_reason
    addon = trainer.get_addon("early_stopping")
    assert (addon.best, addon.wait, addon.stopped_epoch) == (4.0, 3, 5)
    assert any("early stopping at epoch 5" in r.getMessage() for r in caplog.records)


def test_improvements_smaller_than_min_delta_do_not_count() -> None:
    trainer = _run([1.0, 0.95, 0.92, 0.5], monitor="train/score", patience=2, min_delta=0.1)
    assert trainer.progress_checker.epoch == 3 and trainer.get_addon("early_stopping").best == 1.0


def test_max_mode_and_stopping_threshold() -> None:
    trainer = _run([0.5, 0.9, 0.995, 0.999], monitor="train/score", mode="max", stopping_threshold=0.99)
    assert trainer.progress_checker.epoch == 3 and "stopping threshold 0.99" in trainer.stop_reason


def test_divergence_threshold() -> None:
    trainer = _run([1.0, 0.5, 20.0, 0.1], monitor="train/score", divergence_threshold=10.0, patience=100)
    assert trainer.progress_checker.epoch == 3 and "divergence threshold 10" in trainer.stop_reason


def test_non_finite_value_stops_or_counts_as_no_improvement() -> None:
    stopped = _run([1.0, math.nan, 0.5], monitor="train/score", patience=100)
    assert stopped.progress_checker.epoch == 2 and "train/score is nan" in stopped.stop_reason
    kept = _run([1.0, math.nan, 0.5], monitor="train/score", patience=100, check_finite=False)
    assert kept.progress_checker.epoch == 3 and kept.stop_reason is None
    assert kept.get_addon("early_stopping").best == 0.5


def test_monitor_and_mode_default_to_the_trainers() -> None:
    trainer = _run([0.1, 0.2, 0.15, 0.12], trainer_kw={"monitor": "train/score", "monitor_mode": "max"}, patience=2)
    assert trainer.progress_checker.epoch == 4
    assert trainer.get_addon("early_stopping").best == pytest.approx(0.2)
    addon = trainer.get_addon("early_stopping")
    assert addon.monitored_name(trainer) == "train/score"


def test_default_monitor_is_valid_loss_and_epochs_without_validation_are_not_counted() -> None:
    trainer = _run([0.0] * 6, valid=True, trainer_kw={"valid_every_n_epochs": 2}, patience=1, min_delta=100.0)
    addon = trainer.get_addon("early_stopping")
    assert addon.monitored_name(trainer) == "valid/loss"
    # validation at epochs 2 and 4: the first sets best, the second does not improve by 100
    assert trainer.progress_checker.epoch == 4 and addon.wait == 1


def test_a_missing_monitor_names_the_available_metrics() -> None:
    with pytest.raises(TrainerConfigError) as info:
        _run([1.0], monitor="valid/acc")
    assert "'train/score'" in str(info.value) and "set monitor=" in str(info.value)


def test_bad_settings_fail_early() -> None:
    with pytest.raises(ValueError, match="patience"):
        EarlyStoppingAddon(patience=0)
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStoppingAddon(min_delta=-1)
    with pytest.raises(ValueError, match="mode"):
        EarlyStoppingAddon(mode="up")  # type: ignore[arg-type]
    with pytest.raises(TrainerConfigError, match="overlap"):
        _run([1.0], stopping_threshold=5.0, divergence_threshold=1.0)


def test_it_decides_before_the_state_manager_records_the_epoch(tmp_path: Path) -> None:
    cls = Scripted.add_on(StateManagerAddon(save_path=str(tmp_path)), EarlyStoppingAddon)
    names = [a.name for a in cls.addons]
    assert names.index("early_stopping") > names.index("state_manager")  # so it runs first on EPOCH_END
    handlers = [fn.__qualname__.split(".")[0] for _, fn in cls._zt_handlers[next(e for e in cls._zt_handlers if e.name == "EPOCH_END")]]
    assert handlers.index("EarlyStoppingAddon") < handlers.index("StateManagerAddon")


def test_a_resumed_run_keeps_its_patience(tmp_path: Path) -> None:
    scores = [5, 4, 4.5, 4.4, 4.3, 4.2, 1, 1]

    def build(folder: Path, resume: str | None = None) -> Any:
        cls = type("S", (Scripted,), {"scores": scores}).add_on(
            StateManagerAddon(save_path=str(folder), resume=resume), EarlyStoppingAddon(monitor="train/score", patience=3)
        )
        return tiny_trainer(cls)

    whole = build(tmp_path / "whole")
    whole.run(8, tiny_loader(16))
    assert whole.progress_checker.epoch == 5  # epochs 3, 4, 5 without improvement on 4

    first = build(tmp_path / "split")
    first.run(4, tiny_loader(16))  # interrupted after epoch 4 with wait == 2
    assert first.get_addon("early_stopping").wait == 2 and first.stop_reason is None
    resumed = build(tmp_path / "split", resume="latest")
    resumed.run(8, tiny_loader(16))  # "the same run": epochs 5..8 unless stopped
    addon = resumed.get_addon("early_stopping")
    assert resumed.progress_checker.epoch == 5 and addon.stopped_epoch == 5 and addon.best == 4.0
    assert resumed.stop_reason == whole.stop_reason


def test_configured_by_keyword_and_by_name() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on("early_stopping"), patience=7)
    assert trainer.get_addon("early_stopping").patience == 7


def test_conformance(tmp_path: Path) -> None:
    report = check_addon(EarlyStoppingAddon, {"patience": 100}, workdir=tmp_path)
    assert report["sync"] == 0


def test_a_tie_is_not_an_improvement() -> None:
    # the same rule as "best" everywhere: only a strictly better value resets patience
    trainer = _run([2, 3, 3, 3, 4], monitor="train/score", mode="max", patience=2)
    addon = trainer.get_addon("early_stopping")
    assert addon.best == 3.0 and addon.stopped_epoch == 4 and trainer.progress_checker.epoch == 4
