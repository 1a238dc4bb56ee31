"""One rank of a job the tests start themselves (no torchrun agent in between):
``rank_run.py MODE OUT_DIR``. The rank comes from the environment (``RANK``... or SLURM's).

Modes
-----
stop    trains slowly for a long time with a state manager and handled signals, so that the
        test can SIGTERM one rank; writes ``ready-rank<r>`` once past batch 3.
stop-accelerate   the same through AccelerateAddon.
resume  resumes from the checkpoint named by ``RESUME_<rank>`` (ranks may be given different ones).
plain   trains 2 epochs and reports its parameters.

Each rank writes ``OUT_DIR/rank<r>.json`` (status, step, exception type, interrupt step) on exit.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ddp_helpers import ddp_trainer, loader, params  # noqa: E402
from zae_trainer import AddOn  # noqa: E402
from zae_trainer.addons.distributed import current_rank  # noqa: E402
from zae_trainer.addons.multi_gpu import MultiGPUAddon  # noqa: E402
from zae_trainer.addons.state_manager import StateManagerAddon  # noqa: E402


class SlowAndWatched(AddOn):
    """Sleeps a little per batch; records INTERRUPT; says when training is under way."""

    name = "slow_and_watched"

    def __init__(self, *, out_dir: str, pause: float = 0.02) -> None:
        self.out_dir = out_dir
        self.pause = pause
        self.interrupted_at: int | None = None

    def on_train_batch_end(self, trainer: Any) -> None:
        time.sleep(self.pause)
        if trainer.progress_checker.batches == 3:
            open(os.path.join(self.out_dir, f"ready-rank{current_rank()}"), "w").close()

    def on_interrupt(self, trainer: Any, signum: int) -> None:
        self.interrupted_at = trainer.progress_checker.step


def main(mode: str, out_dir: str) -> None:
    rank = current_rank()  # from RANK; under SLURM known only once the trainer has joined
    report: dict[str, Any] = {}
    trainer: Any = None
    try:
        if mode == "stop":
            trainer = ddp_trainer(
                MultiGPUAddon, StateManagerAddon, SlowAndWatched, out_dir=out_dir, save_path=os.path.join(out_dir, "ckpt"),
                handle_signals=True, collective_timeout=float(os.environ.get("COLLECTIVE_TIMEOUT", "300")),
                log_every_n_steps=1000,
            )
            trainer.run(1, loader(8000, batch_size=2))
        elif mode == "stop-accelerate":
            from zae_trainer.addons.accelerate import AccelerateAddon

            trainer = ddp_trainer(
                AccelerateAddon, StateManagerAddon, SlowAndWatched, out_dir=out_dir,
                save_path=os.path.join(out_dir, "ckpt"), handle_signals=True, log_every_n_steps=1000,
            )
            trainer.run(1, loader(8000, batch_size=2))
        elif mode == "resume":
            trainer = ddp_trainer(
                MultiGPUAddon, StateManagerAddon, save_path=os.path.join(out_dir, f"ckpt-rank{rank}"),
                resume=os.environ[f"RESUME_{rank}"], collective_timeout=300.0,
            )
            trainer.run(3, loader(48, batch_size=4))
        else:
            trainer = ddp_trainer(MultiGPUAddon, collective_timeout=300.0)
            trainer.run(2, loader(48, batch_size=4), loader(20, batch_size=4, seed=7))
            report["params"] = [p.flatten().tolist() for p in params(trainer)]
            report["metrics"] = trainer.epoch_metrics
    except BaseException as exc:
        report["exception"] = type(exc).__name__
        report["message"] = str(exc)
        report["traceback"] = traceback.format_exc()
        raise
    finally:
        rank = current_rank()
        report["rank"] = rank
        if trainer is not None:
            report["status"] = trainer.summary.status
            report["step"] = trainer.progress_checker.step
            report["world_size"] = trainer.world_size
            watcher = trainer.addon_of(SlowAndWatched)
            report["interrupted_at"] = watcher.interrupted_at if watcher is not None else None
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(report, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
