"""Run under a launcher (torchrun / accelerate launch): ``launched_run.py OUT_DIR [accelerate]``.

Every process builds the same trainer; each writes what it saw to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch.distributed as dist  # noqa: E402

from ddp_helpers import ddp_trainer, loader, params  # noqa: E402


def main(out_dir: str, which: str) -> None:
    if which == "accelerate":
        from zae_trainer.addons.accelerate import AccelerateAddon

        trainer = ddp_trainer(AccelerateAddon)
    else:
        from zae_trainer.addons.multi_gpu import MultiGPUAddon

        trainer = ddp_trainer(MultiGPUAddon, collective_timeout=60.0)
    trainer.run(2, loader(48, batch_size=4), loader(20, batch_size=4, seed=7))
    report = {
        "rank": int(os.environ["RANK"]),
        "world_size": trainer.world_size,
        "is_main": trainer.is_main_process,
        "params": [p.flatten().tolist() for p in params(trainer)],
        "metrics": trainer.epoch_metrics,
        "group_after_run": dist.is_initialized(),
        "model_type": type(trainer.model).__name__,
    }
    with open(os.path.join(out_dir, f"rank{report['rank']}.json"), "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp")
