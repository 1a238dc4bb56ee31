"""Trains with every logger and a state manager, then blocks inside step 11 until it is killed.

Run by tests/test_log_crash_resume.py as ``python train_until_killed.py <root>``. The last
checkpoint is the end of epoch 1 (step 6); the loggers have rows up to step 10 when the test
sends SIGKILL. After the checkpoint the loss is scaled, so this process's rows past step 6
differ from the ones the resumed process replays, and a test can tell which one it reads.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crash_resume_setup import build_trainer, train  # noqa: E402

from zae_trainer.testing import TinyRegressionTrainer  # noqa: E402


class DiesAfterStep10(TinyRegressionTrainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        step = self.progress_checker.step
        if step == 10:
            (Path(os.environ["ZT_CRASH_ROOT"]) / "blocked").write_text("at step 10")
            while True:  # wait for SIGKILL
                time.sleep(0.5)
        outputs = super().train_step(batch)
        if step >= 6:  # past the checkpoint: values only this doomed process logs
            outputs["loss"] = outputs["loss"] * 1.5
        return outputs


if __name__ == "__main__":
    root = Path(sys.argv[1])
    os.environ["ZT_CRASH_ROOT"] = str(root)
    train(build_trainer(DiesAfterStep10, root, resume=False))
