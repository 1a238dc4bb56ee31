"""Saves a large checkpoint over and over; prints ``writing`` as each write starts.

The fault tests SIGKILL this process in the middle of a write, or run it under a
file-size limit (``--fsize-limit``, with SIGXFSZ ignored so the write fails with EFBIG
instead of killing the process) and print what happened as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from zae_trainer import AddOn, Trainer  # noqa: E402
from zae_trainer.addons import StateManagerAddon  # noqa: E402
from zae_trainer.addons.checkpoint import CheckpointWriteError  # noqa: E402


class Plain(Trainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        return {"loss": self.model(batch[0]).sum()}

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self.train_step(batch)


class AnnounceWrites(AddOn):
    def on_checkpoint_save(self, trainer: Any, checkpoint: dict) -> None:
        print("writing", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save-path", required=True)
    parser.add_argument("--format", default="ckpt")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--fsize-limit", type=int, default=0)
    parser.add_argument("--saves", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(4)])
    trainer = Plain.add_on(StateManagerAddon, AnnounceWrites)(
        model, "cpu", "train", torch.optim.SGD(model.parameters(), lr=0.1), None,
        save_path=args.save_path, save_format=args.format, keep_last=2, log_bar=False,
    )
    first = trainer.save_state()
    print(f"saved {first}", flush=True)
    if args.fsize_limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_limit, resource.RLIM_INFINITY))
        with torch.no_grad():
            model[0].weight.add_(1.0)
        try:
            trainer.save_state()
            result: dict[str, Any] = {"error": None}
        except CheckpointWriteError as exc:
            result = {"error": str(exc), "type": type(exc).__name__}
        result["listing"] = sorted(os.listdir(args.save_path))
        print("RESULT " + json.dumps(result), flush=True)
        return
    for _ in range(args.saves):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        print(f"saved {trainer.save_state()}", flush=True)


if __name__ == "__main__":
    main()
