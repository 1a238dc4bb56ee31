"""Shared pieces of the logger tests: a tap that records what the core handed to loggers."""

from __future__ import annotations

import os
import signal
from typing import Any, Mapping

from zae_trainer import AddOn
from zae_trainer.testing import TinyRegressionTrainer

#: ``neptune.init_run`` options that keep the client's extras (hardware monitoring threads,
#: stdout capture, git and source snapshots) out of test runs.
QUIET = {
    "capture_hardware_metrics": False,
    "capture_stdout": False,
    "capture_stderr": False,
    "capture_traceback": False,
    "git_ref": False,
    "source_files": [],
}


class MetricTap(AddOn):
    """Records each LOG's metrics and each epoch's metrics, with the step they belong to.

    ``order = 200`` runs it after the loggers on LOG, so it sees the dict they saw.
    """

    name = "metric_tap"
    order = 200

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, float]]] = []
        self.epochs: list[tuple[int, int, dict[str, float]]] = []

    def on_log(self, trainer: Any, metrics: Mapping[str, float]) -> None:
        record = dict(metrics)
        record["lr"] = trainer.optimizer.param_groups[0]["lr"]
        self.steps.append((trainer.progress_checker.step, record))

    def on_epoch_end(self, trainer: Any) -> None:
        pc = trainer.progress_checker
        self.epochs.append((pc.step, pc.epoch, dict(trainer.epoch_metrics)))

    def expected_series(self, key: str) -> list[tuple[int, float]]:
        """``[(step, value)]`` the loggers must have written for ``key`` (epoch keys: ``epoch/<name>``)."""
        if key.startswith("epoch/"):
            name = key[len("epoch/"):]
            if name == "index":
                return [(step, epoch) for step, epoch, _ in self.epochs]
            return [(step, m[name]) for step, _, m in self.epochs if name in m]
        return [(step, m[key]) for step, m in self.steps if key in m]

    def expected_epoch_series(self, key: str) -> list[tuple[int, float]]:
        """``[(epoch, value)]`` for an epoch key (``epoch/<name>``): epoch metrics against the 1-based epoch."""
        name = key[len("epoch/"):]
        return [(epoch, m[name]) for _, epoch, m in self.epochs if name in m]


class FailsAtStep3(TinyRegressionTrainer):
    """Raises inside ``train_step`` at the third step: a run a logger must mark failed."""

    def train_step(self, batch: Any) -> dict[str, Any]:
        if self.progress_checker.step == 2:
            raise RuntimeError("boom at step 3")
        return super().train_step(batch)


class SignalsItselfAtStep3(TinyRegressionTrainer):
    """Sends itself ``interrupt_with`` (SIGTERM by default) inside the third step: a real signal,
    handled by the trainer at the next batch boundary (build it with ``handle_signals=True``)."""

    interrupt_with: int = signal.SIGTERM

    def train_step(self, batch: Any) -> dict[str, Any]:
        if self.progress_checker.step == 2:
            os.kill(os.getpid(), self.interrupt_with)
        return super().train_step(batch)


class SigintsItselfAtStep3(SignalsItselfAtStep3):
    interrupt_with = signal.SIGINT
