"""ThroughputMonitorAddon: interval timing against a fake clock, what loggers see, no per-step sync."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from zae_trainer import AddOn, Event
from zae_trainer.addons import throughput as throughput_module
from zae_trainer.addons.state_manager import StateManagerAddon
from zae_trainer.addons.throughput import ThroughputMonitorAddon
from zae_trainer.testing import TinyRegressionTrainer, check_addon, tiny_loader, tiny_trainer


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Timed(TinyRegressionTrainer):
    """A training batch takes 0.1 s of fake time, a validation batch 10 s."""

    clock: FakeClock

    def train_step(self, batch: Any) -> dict[str, Any]:
        self.clock.now += 0.1
        return super().train_step(batch)

    def test_step(self, batch: Any) -> dict[str, Any]:
        self.clock.now += 10.0
        return super().test_step(batch)


class Capture(AddOn):
    order = 100  # where loggers sit

    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    def on_log(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.logged.append(dict(metrics))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(throughput_module.time, "perf_counter", fake)
    Timed.clock = fake
    return fake


def test_rates_over_each_interval_exclude_validation(clock: FakeClock) -> None:
    trainer = tiny_trainer(Timed.add_on(ThroughputMonitorAddon(flops_per_sample=1e6), Capture), log_every_n_steps=2)
    trainer.run(2, tiny_loader(48), tiny_loader(16))  # 6 batches of 8 per epoch, 2 validation batches of 8
    logged = trainer.get_addon("Capture").logged
    assert len(logged) == 6  # 3 log points per epoch
    for metrics in logged:  # every interval: 2 batches of 8 samples in 0.2 s, validation (20 s) left out
        assert metrics["throughput/samples_per_sec"] == pytest.approx(80.0)
        assert metrics["throughput/batches_per_sec"] == pytest.approx(10.0)
        assert metrics["throughput/step_time"] == pytest.approx(0.1)
        assert metrics["throughput/flops_per_sec"] == pytest.approx(80e6)
        assert "train/loss" in metrics
    assert trainer.get_addon("throughput").last == {k: v for k, v in logged[-1].items() if k.startswith("throughput/")}


def test_step_time_counts_optimizer_steps_under_accumulation(clock: FakeClock) -> None:
    trainer = tiny_trainer(Timed.add_on(ThroughputMonitorAddon, Capture), log_every_n_steps=1, accumulate_grad_batches=3)
    trainer.run(1, tiny_loader(48))
    logged = trainer.get_addon("Capture").logged
    assert len(logged) == 2
    assert all(m["throughput/step_time"] == pytest.approx(0.3) for m in logged)
    assert all(m["throughput/batches_per_sec"] == pytest.approx(10.0) for m in logged)
    assert "throughput/flops_per_sec" not in logged[0]


def test_it_measures_before_step_checkpoints_and_loggers(tmp_path: Path) -> None:
    cls = TinyRegressionTrainer.add_on(Capture, StateManagerAddon(save_path=str(tmp_path)), ThroughputMonitorAddon)
    on_log = [fn.__qualname__.split(".")[0] for _, fn in cls._zt_handlers[Event.LOG]]
    assert on_log == ["ThroughputMonitorAddon", "StateManagerAddon", "Capture"]


def test_real_clock_gives_positive_rates() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(ThroughputMonitorAddon, Capture), log_every_n_steps=3)
    trainer.run(1, tiny_loader(48))
    for metrics in trainer.get_addon("Capture").logged:
        assert metrics["throughput/samples_per_sec"] > 0
        assert metrics["throughput/samples_per_sec"] == pytest.approx(8 * metrics["throughput/batches_per_sec"])


def test_bad_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="flops_per_sample"):
        ThroughputMonitorAddon(flops_per_sample=0)


def test_configured_by_keyword_and_by_name() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on("throughput"), flops_per_sample=10.0)
    assert trainer.get_addon("throughput").flops_per_sample == 10.0


def test_conformance(tmp_path: Path) -> None:
    report = check_addon(ThroughputMonitorAddon, workdir=tmp_path)
    assert report["sync"] == 0
