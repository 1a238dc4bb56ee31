"""A small training run that can be killed and resumed; used by the state-manager tests.

Everything random is in play: a shuffling sampler, dropout, Python's and numpy's RNG
(each step draws from both), Adam, a step LR scheduler and gradient clipping. Per-step losses
are kept by a stateful add-on (:class:`LossRecorder`), so they resume with everything else. Run as a
script it trains with ``resume="latest"``, prints ``step N`` after every batch (so a
parent can kill it), and at the end writes the final parameters, optimizer state and
per-step losses to ``--out`` (a ``torch.save`` file of tensors).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root

from zae_trainer import AddOn, Trainer  # noqa: E402
from zae_trainer.addons import GradientClippingAddon, StateManagerAddon  # noqa: E402

EPOCHS = 3
BATCHES_PER_EPOCH = 9


class NoisyRegression(Trainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        # Python's and numpy's generators feed the loss, so resuming must restore them too.
        jitter = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
        return {"loss": nn.functional.mse_loss(self.model(x), y) * jitter}

    def test_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model(x), y)}


class AnnounceSteps(AddOn):
    """Prints ``step N`` after each training batch; sleeps so a parent has time to kill."""

    def __init__(self, *, announce: bool = False, step_sleep: float = 0.0) -> None:
        self.announce = announce
        self.step_sleep = step_sleep

    def on_train_batch_end(self, trainer: Any) -> None:
        if self.announce:
            print(f"step {trainer.progress_checker.step}", flush=True)
        if self.step_sleep:
            time.sleep(self.step_sleep)


class LossRecorder(AddOn):
    """Keeps every step's training loss (log point of each step); stateful, so it resumes with the run.

    Checkpoints no longer carry per-step losses; this add-on's state does, and comparing its
    list after a resume also checks that add-on state comes back exactly.
    """

    order = -200  # before the state manager (-100) on LOG: a step checkpoint then holds its own step's loss

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, trainer: Any, metrics: Any) -> None:
        self.losses.append(float(metrics["train/loss"]))

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = [float(v) for v in state["losses"]]


def make_loader(workers: int = 0, stateful: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(BATCHES_PER_EPOCH * 8, 6, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(len(x), 1, generator=g)
    kind: type = DataLoader
    if stateful:
        from torchdata.stateful_dataloader import StatefulDataLoader

        kind = StatefulDataLoader
    return kind(TensorDataset(x, y), batch_size=8, shuffle=True, num_workers=workers)


def make_valid_loader() -> DataLoader:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 6, generator=g)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)


def seed_everything(seed: int = 1234) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_trainer(save_path: str, **settings: Any) -> Any:
    """A fresh trainer, seeded; ``settings`` go to the constructor (add-on settings included)."""
    seed_everything()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    settings.setdefault("log_bar", False)
    settings.setdefault("handle_signals", False)
    settings.setdefault("save_every_n_steps", 1)
    settings.setdefault("log_every_n_steps", 1)
    cls = NoisyRegression.add_on(StateManagerAddon, AnnounceSteps, GradientClippingAddon(max_norm=0.5), LossRecorder)
    return cls(model, "cpu", "train", optimizer, scheduler, save_path=save_path, **settings)


def outcome(trainer: Any) -> dict[str, Any]:
    """What an exact resume must reproduce bit for bit."""
    opt = trainer.optimizer.state_dict()
    return {
        "params": {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()},
        "optimizer": {f"{i}.{k}": v.clone() for i, s in opt["state"].items() for k, v in s.items()},
        "losses": torch.tensor(trainer.get_addon(LossRecorder).losses, dtype=torch.float64),
        "lr": torch.tensor(trainer.current_lr(), dtype=torch.float64),
        "step": torch.tensor(trainer.progress_checker.step),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save-path", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--format", default="ckpt")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--handle-signals", action="store_true")
    args = parser.parse_args()
    trainer = make_trainer(
        args.save_path,
        save_format=args.format,
        resume="latest",
        announce=True,
        step_sleep=args.step_sleep,
        handle_signals=args.handle_signals,
        keep_last=2,
    )
    trainer.run(EPOCHS, make_loader(args.workers), make_valid_loader())
    torch.save(outcome(trainer), args.out)
    print("done", flush=True)


if __name__ == "__main__":
    main()
