"""Metrics that are not batch means: F1 and AUROC with torchmetrics, on a real data set.

A step's scalar outputs are averaged over the epoch, which is right for a loss and wrong for
F1 or AUROC (the mean of per-batch F1 scores is not the F1 score of the epoch). A
torchmetrics ``Metric`` returned from a step is instead updated per batch (on the device, no
host synchronisation) and computed once when the phase ends, over all its batches; under DDP
torchmetrics gathers its state from every process before computing. Its value appears in the
epoch metrics as ``train/f1``, ``valid/auroc``, ... and can be monitored like any other.

The data is scikit-learn's bundled breast cancer set (569 samples, 30 features, no download):
a binary task with unbalanced classes, where F1 and AUROC say more than accuracy.

Run:  python examples/torchmetrics_f1.py [--epochs 15]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import BinaryAUROC, BinaryF1Score

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from zae_trainer import Trainer, seed_everything  # noqa: E402


class CancerTrainer(Trainer):
    """Binary classification from one logit; F1 in both phases, AUROC in validation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One Metric object per phase, created once and moved to the trainer's device.
        # validate_args=False skips input checks that would read values on the host per step.
        self.train_f1 = BinaryF1Score(validate_args=False).to(self.device)
        self.valid_f1 = BinaryF1Score(validate_args=False).to(self.device)
        # thresholds=None is exact and keeps every prediction of the phase; for large
        # validation sets, thresholds=200 keeps a fixed-size state instead.
        self.valid_auroc = BinaryAUROC(thresholds=None, validate_args=False).to(self.device)

    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        logits = self.model(x).squeeze(1)
        self.train_f1.update(logits.detach().sigmoid(), y)
        return {"loss": nn.functional.binary_cross_entropy_with_logits(logits, y.float()), "f1": self.train_f1}

    def test_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        logits = self.model(x).squeeze(1)
        probabilities = logits.sigmoid()
        self.valid_f1.update(probabilities, y)
        self.valid_auroc.update(probabilities, y)
        return {
            "loss": nn.functional.binary_cross_entropy_with_logits(logits, y.float()),
            "f1": self.valid_f1,
            "auroc": self.valid_auroc,
            "output": probabilities,  # what trainer.inference() returns
        }


def load_split(seed: int = 0, valid_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """Stratified, seeded train/validation split; features standardised with training statistics."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_valid = train_test_split(
        range(len(y)), test_size=valid_fraction, random_state=seed, stratify=data.target
    )
    mean, std = x[idx_train].mean(0), x[idx_train].std(0)
    x = (x - mean) / std
    return TensorDataset(x[idx_train], y[idx_train]), TensorDataset(x[idx_valid], y[idx_valid])


def main(argv: list[str] | None = None) -> CancerTrainer:
    parser = argparse.ArgumentParser(description="F1 and AUROC with torchmetrics on the breast cancer data.")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    seed_everything(args.seed)  # recorded in trainer.config["seed"]
    train_set, valid_set = load_split(seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    valid_loader = DataLoader(valid_set, batch_size=16)  # several batches: F1 is over all of them
    model = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 1))
    trainer = CancerTrainer(
        model,
        device=None,  # CUDA, MPS or XPU when present, else the CPU
        optimizer=torch.optim.Adam(model.parameters(), lr=args.lr),
        monitor="valid/auroc",
        monitor_mode="max",
        log_bar=False,
        config=vars(args),
    )
    trainer.run(args.epochs, train_loader, valid_loader)
    m = trainer.epoch_metrics
    best = trainer.best
    print(
        f"epoch {trainer.progress_checker.epoch}: train F1 {m['train/f1']:.4f}, valid F1 {m['valid/f1']:.4f}, "
        f"valid AUROC {m['valid/auroc']:.4f} (best AUROC {best['value']:.4f} at epoch {best['epoch']})"
    )
    return trainer


if __name__ == "__main__":
    main()
