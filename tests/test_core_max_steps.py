"""run(max_steps=...) and valid_every_n_steps: exact step counts and event sequences."""

from __future__ import annotations

from typing import Any, Mapping

import pytest

from zae_trainer import AddOn
from zae_trainer.errors import TrainerConfigError

from core_helpers import Recorder, TinyTrainer, tiny_loader, tiny_trainer

# tiny_loader(): 20 samples in batches of 8 -> 3 batches per epoch


class LogCapture(AddOn):
    name = "log_capture"

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def on_log(self, trainer: Any, metrics: Mapping[str, float]) -> None:
        self.rows.append((trainer.progress_checker.step, dict(metrics)))


def coarse(trace: list[str]) -> list[str]:
    """The trace without the per-batch and per-step events."""
    noisy = ("TRAIN_BATCH", "BEFORE_", "AFTER_", "VALID_BATCH_END", "LOG")
    return [t for t in trace if not t.startswith(noisy)]


def test_max_steps_stops_mid_epoch_and_the_epoch_ends_early() -> None:
    trainer = tiny_trainer(TinyTrainer.add_on(Recorder))
    trainer.run(None, tiny_loader(), tiny_loader(n=12, seed=1), max_steps=5)
    pc = trainer.progress_checker
    assert (pc.step, pc.batches, pc.epoch, pc.batch_in_epoch, pc.samples) == (5, 5, 2, 0, 20 + 16)
    assert coarse(trainer.get_addon(Recorder).trace) == [
        "RUN_BEGIN e0 s0",
        "EPOCH_BEGIN e0 s0",
        "VALID_BEGIN e0 s3",  # valid_every_n_epochs=1
        "VALID_END e0 s3",
        "EPOCH_END e1 s3",
        "EPOCH_BEGIN e1 s3",
        "VALID_BEGIN e1 s5",  # the final validation, after the fifth step
        "VALID_END e1 s5",
        "EPOCH_END e2 s5",
        "RUN_END e2 s5",
    ]
    assert trainer.summary.status == "finished" and trainer.stop_reason is None
    assert len(trainer.history) == 2 and "valid/loss" in trainer.history[1]

    # a later run goes on from a fresh epoch, max_steps more steps
    trainer.run(None, tiny_loader(), max_steps=4)
    assert (pc.step, pc.epoch) == (9, 4)


def test_max_steps_with_n_epoch_stops_at_whichever_comes_first() -> None:
    trainer = tiny_trainer()
    trainer.run(1, tiny_loader(), max_steps=100)
    assert (trainer.progress_checker.step, trainer.progress_checker.epoch) == (3, 1)
    trainer.run(10, tiny_loader(), max_steps=2)
    assert (trainer.progress_checker.step, trainer.progress_checker.epoch) == (5, 2)


def test_max_steps_counts_optimizer_steps_under_accumulation() -> None:
    trainer = tiny_trainer(accumulate_grad_batches=2)
    trainer.run(None, tiny_loader(n=40), max_steps=2)  # 5 batches per epoch: steps at batches 2 and 4
    pc = trainer.progress_checker
    assert (pc.step, pc.batches, pc.epoch) == (2, 4, 1)


def test_valid_every_n_steps_validates_mid_epoch_and_logs_at_the_step() -> None:
    built = TinyTrainer.add_on(Recorder, LogCapture)
    trainer = tiny_trainer(built, valid_every_n_steps=2, log_every_n_steps=100)
    trainer.run(2, tiny_loader(), tiny_loader(n=12, seed=1))
    trace = coarse(trainer.get_addon(Recorder).trace)
    assert trace == [
        "RUN_BEGIN e0 s0",
        "EPOCH_BEGIN e0 s0",
        "VALID_BEGIN e0 s2",
        "VALID_END e0 s2",
        "EPOCH_END e1 s3",
        "EPOCH_BEGIN e1 s3",
        "VALID_BEGIN e1 s4",
        "VALID_END e1 s4",
        "VALID_BEGIN e1 s6",  # step 6 is the run's last: no second validation at the epoch end
        "VALID_END e1 s6",
        "EPOCH_END e2 s6",
        "RUN_END e2 s6",
    ]
    rows = trainer.get_addon(LogCapture).rows
    valid_rows = [(step, m) for step, m in rows if "valid/loss" in m]
    assert [step for step, _ in valid_rows] == [2, 4, 6]
    assert all(set(m) == {"valid/loss"} for _, m in valid_rows)  # named like the epoch metric
    # an epoch's valid/* are its latest validation's
    assert trainer.history[0]["valid/loss"] == valid_rows[0][1]["valid/loss"]
    assert trainer.history[1]["valid/loss"] == valid_rows[2][1]["valid/loss"]


def test_valid_every_n_steps_with_max_steps_ends_with_one_validation() -> None:
    trainer = tiny_trainer(TinyTrainer.add_on(Recorder, LogCapture), valid_every_n_steps=2)
    trainer.run(None, tiny_loader(), tiny_loader(n=12, seed=1), max_steps=5)
    trace = coarse(trainer.get_addon(Recorder).trace)
    valid_steps = [t.split()[-1] for t in trace if t.startswith("VALID_BEGIN")]
    assert valid_steps == ["s2", "s4", "s5"]  # every 2 steps, and the final one at step 5


def test_run_needs_epochs_or_steps_and_checks_them() -> None:
    trainer = tiny_trainer()
    with pytest.raises(TrainerConfigError, match="n_epoch, max_steps or both"):
        trainer.run(None, tiny_loader())
    with pytest.raises(ValueError, match="max_steps"):
        trainer.run(None, tiny_loader(), max_steps=0)
    with pytest.raises(ValueError, match="valid_every_n_steps"):
        tiny_trainer(valid_every_n_steps=0)
    assert trainer.progress_checker.step == 0
