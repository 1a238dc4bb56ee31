"""lis2-style: a model with its own config, a snapshot per save (model config and state,
epochs run, best loss, optimizer and scheduler state, the global config), a save every N
epochs and of the last epoch, and data-parallel training (DDP) over several processes.

* The model carries a ``config`` dict; the state manager stores it with every checkpoint
  (``model_config``), so a snapshot rebuilds the model without the training script.
* ``save_every_n_epochs=2`` and ``save_last=True``: periodic snapshots are kept by their own
  rule (``keep_periodic``, all by default), not rotated away by ``keep_last=1``; names carry a
  prefix (``filename_prefix="regressor-"``) and ``last.ckpt`` / ``best.ckpt`` are fixed paths
  (links) for scripts that do not read the manifest.
* ``MultiGPUAddon`` with ``device="cpu", world_size=2`` starts two processes over gloo (on GPUs:
  ``device=["cuda:0", "cuda:1"]``, or launch the script with ``torchrun``); only rank 0 writes
  checkpoints, and they hold the unwrapped model. ``--world-size 1`` trains in this process.
* After training, ``last.ckpt`` is read back in lis2's layout with
  ``read_snapshot(path, layout="lis2")``: ``{MODEL: {config, state}, TRAIN_INFO: {epochs_run,
  best_loss, optimizer, scheduler}, GLOBAL_CONFIG}``, and the model is rebuilt from it. lis2's
  own snapshot files load the same way, and resume (``resume=<path>``).

Run:  python examples/from_other_trainers/lis2_style.py [--world-size 2] [--epochs 6]
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

from zae_trainer import Trainer  # noqa: E402
from zae_trainer.addons import MultiGPUAddon, StateManagerAddon  # noqa: E402
from zae_trainer.addons.checkpoint import read_snapshot  # noqa: E402


class Regressor(nn.Module):
    """A model that knows how it was built (lis2 stored ``MODEL.config`` beside the weights)."""

    def __init__(self, inputs: int = 5, hidden: int = 16) -> None:
        super().__init__()
        self.config = {"inputs": inputs, "hidden": hidden}
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Lis2Trainer(Trainer):
    """The user's own steps: mean squared error."""

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model(x), y)}

    def test_step(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.train_step(batch)


def make_loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 5, generator=g)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3] + 0.05 * torch.randn(512, 1, generator=g)
    return (
        DataLoader(TensorDataset(x[:448], y[:448]), batch_size=32, shuffle=True,
                   generator=torch.Generator().manual_seed(seed)),
        DataLoader(TensorDataset(x[448:], y[448:]), batch_size=64),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--world-size", type=int, default=2, help="processes (gloo on CPU); 1: no DDP")
    parser.add_argument("--out", default=None, help="checkpoint folder (default: a temporary one)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="lis2-style-")
    save_path = os.path.join(out, "snapshots")

    torch.manual_seed(0)
    model = Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    addons: list[Any] = [
        StateManagerAddon(save_path=save_path, save_every_n_epochs=args.save_every, save_last=True,
                          keep_top_k=1, keep_last=1, filename_prefix="regressor-"),
    ]
    if args.world_size > 1:
        addons.append(MultiGPUAddon(world_size=args.world_size, collective_timeout=120.0))
    trainer = Lis2Trainer.add_on(*addons)(
        model, device="cpu", optimizer=optimizer, scheduler=scheduler, log_bar=False,
        config={"experiment": "lis2-style", "world_size": args.world_size, "lr": 0.05},
    )
    train, valid = make_loaders()
    trainer.run(args.epochs, train, valid)  # with world_size > 1: one process per rank, then back here

    snapshot = read_snapshot(os.path.join(save_path, "last.ckpt"), layout="lis2")  # a fixed path
    rebuilt = Regressor(**snapshot["MODEL"]["config"])
    rebuilt.load_state_dict(snapshot["MODEL"]["state"])
    info = snapshot["TRAIN_INFO"]
    saved = sorted(n for n in os.listdir(save_path) if n.startswith("regressor-"))
    print(f"snapshots in {save_path}: {', '.join(saved)}")
    print(
        f"last.ckpt: epochs_run {info['epochs_run']}, best_loss {info['best_loss']:.4f}, "
        f"GLOBAL_CONFIG {snapshot['GLOBAL_CONFIG']}; model rebuilt from MODEL.config {snapshot['MODEL']['config']}"
    )
    return {"trainer": trainer, "snapshot": snapshot, "rebuilt": rebuilt, "saved": saved, "out": out}


if __name__ == "__main__":
    main()
