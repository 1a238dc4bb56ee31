"""The run's training seconds carry across run() calls and resumes, as the loggers' clocks do."""

from __future__ import annotations

import json
from typing import Any

import pytest

from zae_trainer.addons import LocalLoggerAddon, StateManagerAddon

from core_helpers import TinyTrainer, tiny_loader, tiny_trainer


def test_run_seconds_add_up_over_run_calls() -> None:
    trainer = tiny_trainer()
    trainer.run(1, tiny_loader())
    first = trainer.summary.seconds
    assert trainer.summary.run_seconds == pytest.approx(first)
    trainer.run(1, tiny_loader())
    assert trainer.summary.run_seconds == pytest.approx(first + trainer.summary.seconds)
    assert trainer.run_seconds == pytest.approx(trainer.summary.run_seconds)  # the clock stopped with the run


def test_a_resumed_run_continues_the_clock_and_agrees_with_the_logger(tmp_path: Any) -> None:
    built = TinyTrainer.add_on(StateManagerAddon, LocalLoggerAddon)
    settings = {"save_path": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "logs")}
    first = tiny_trainer(built, **settings)
    first.run(1, tiny_loader())
    saved = first.state_dict()["seconds"]
    assert saved == pytest.approx(first.summary.run_seconds)

    resumed = tiny_trainer(built, resume="latest", **settings)
    resumed.run(2, tiny_loader())
    s = resumed.summary
    assert s.run_seconds is not None and s.run_seconds > s.seconds  # more than this process trained
    logged = json.loads((tmp_path / "logs" / "summary.json").read_text())
    # the console's total and summary.json's come from the same checkpoint: equal up to clock reads
    assert logged["seconds"] == pytest.approx(s.run_seconds, abs=0.05)


def test_the_console_summary_prints_the_runs_total() -> None:
    from zae_trainer.display import RunSummary

    assert "in 12.0s (3.5s in this run() call)" in str(RunSummary(seconds=3.5, run_seconds=12.0, status="finished"))
    assert "in 3.5s\n" in str(RunSummary(seconds=3.5, run_seconds=3.5, status="finished")) + "\n"
