"""One trainer with every logger and a state manager, built the same way by the doomed process
(tests/logging_scripts/train_until_killed.py) and by the test that resumes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from logging_helpers import QUIET, MetricTap
from zae_trainer.addons import StateManagerAddon
from zae_trainer.addons.local_logger import LocalLoggerAddon
from zae_trainer.addons.mlflow_logger import MLflowLoggerAddon
from zae_trainer.addons.neptune_logger import NeptuneLoggerAddon
from zae_trainer.addons.wandb_logger import WandBLoggerAddon
from zae_trainer.testing import tiny_loader, tiny_trainer

EPOCHS = 3


def build_trainer(cls: type, root: Path, resume: bool) -> Any:
    addons = (
        WandBLoggerAddon(project="zt-crash", mode="offline", dir=str(root), resume_run=resume),
        NeptuneLoggerAddon(project="ws/zt-crash", mode="offline", resume_run=resume, **QUIET),
        MLflowLoggerAddon(tracking_uri=root / "mlruns", experiment_name="zt-crash", resume_run=resume),
        LocalLoggerAddon(log_dir=root / "logs", tensorboard=False),
        StateManagerAddon(save_path=root / "ckpt", resume="latest" if resume else None),
        MetricTap,
    )
    return tiny_trainer(cls.add_on(*addons), config={"lr": 0.05})


def train(trainer: Any) -> None:
    trainer.run(EPOCHS, tiny_loader(), tiny_loader(16, seed=7))
