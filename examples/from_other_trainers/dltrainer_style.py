"""DLTrainer-style: a classifier with a label-smoothed loss, train / validate / test, test
with the best or the final weights, early stopping.

What DLTrainer users wrote as one class with ``train()``, ``validate()`` and ``test()`` is,
here, a :class:`~zae_trainer.SupervisedTrainer` built from keyword settings, two add-ons,
and one call per phase:

* the loss by name with label smoothing: ``loss="cross_entropy"`` (multi-class) or
  ``loss="bce"`` (binary, one logit per sample), ``label_smoothing=0.1``;
* validation every epoch picks the best epoch (``monitor="valid/loss"``); the state manager
  keeps the best checkpoint and the last one;
* ``EarlyStoppingAddon`` stops when the validation loss has not improved for ``patience`` epochs;
* ``trainer.test(weights="best")`` (or ``"last"``) evaluates the test split once, after
  training, and returns ``test/loss`` and ``test/acc``. The test split plays no part in
  training or in choosing the best epoch, and testing changes nothing of the run.

Run:  python examples/from_other_trainers/dltrainer_style.py [--task binary] [--test-weights last]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from zae_trainer import SupervisedTrainer  # noqa: E402
from zae_trainer.addons import EarlyStoppingAddon, StateManagerAddon  # noqa: E402


def make_splits(task: str, seed: int = 0) -> dict[str, TensorDataset]:
    """Three Gaussian blobs in 8 dimensions (or two, for ``binary``): train / valid / test."""
    g = torch.Generator().manual_seed(seed)
    classes = 2 if task == "binary" else 3
    centres = 2.0 * torch.randn(classes, 8, generator=g)
    splits = {}
    for name, n in (("train", 480), ("valid", 120), ("test", 120)):
        y = torch.randint(0, classes, (n,), generator=g)
        x = centres[y] + 1.5 * torch.randn(n, 8, generator=g)
        splits[name] = TensorDataset(x, y.float() if task == "binary" else y)
    return splits


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["multiclass", "binary"], default="multiclass")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--test-weights", choices=["best", "last"], default="best")
    parser.add_argument("--out", default=None, help="checkpoint folder (default: a temporary one)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="dltrainer-style-")

    torch.manual_seed(0)
    splits = make_splits(args.task)
    binary = args.task == "binary"
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1 if binary else 3))
    Built = SupervisedTrainer.add_on(
        StateManagerAddon(save_path=os.path.join(out, "ckpt"), keep_top_k=1, keep_last=1),
        EarlyStoppingAddon(patience=args.patience),
    )
    trainer = Built(
        model,
        device="cpu",
        optimizer="AdamW",
        lr=1e-2,
        loss="bce" if binary else "cross_entropy",
        label_smoothing=0.1,
        train_dataset=splits["train"],
        valid_dataset=splits["valid"],
        test_dataset=splits["test"],
        batch_size=32,
        valid_batch_size=120,
        seed=0,
        monitor="valid/loss",
        log_bar=False,
    )
    trainer.run(args.epochs)  # train + validate every epoch, until early stopping or the last epoch

    # the test split, once: with the best epoch's weights (from the checkpoint) or the final ones.
    # test() changes nothing of the run (history, progress, summary, and the weights it loaded).
    test = trainer.test(weights=args.test_weights)
    epochs_run = len(trainer.history)
    print(
        f"{args.task}: {epochs_run} epoch(s){' (stopped early: ' + trainer.stop_reason + ')' if trainer.stop_reason else ''}; "
        f"best epoch {trainer.best['epoch']} (valid/loss {trainer.best['value']:.4f}); "
        f"test with the {args.test_weights} weights: loss {test['test/loss']:.4f}, acc {test['test/acc']:.4f}"
    )
    return {"trainer": trainer, "test": test, "out": out}


if __name__ == "__main__":
    main()
