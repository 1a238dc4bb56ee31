"""MINDS-style: one config dict describes the whole trainer; keep the top 3 checkpoints by
validation loss, the last one and the best one; log to Weights & Biases (offline here).

MINDS users kept a nested dict (model, optimizer, scheduler, loss, checkpointing, W&B) and a
trainer that read it. :func:`zae_trainer.from_config` reads the same kind of dict (or a
YAML file with the same keys): names are resolved, and misspelt keys fail, before training.

* ``keep_top_k: 3`` keeps the three best epochs by the monitored metric (``valid/loss``);
  ``keep_last: 1`` and ``save_last: true`` keep the newest one as well; a checkpoint that is
  both is one file. ``manifest.json`` names the best and the latest, and ``best.ckpt`` /
  ``last.ckpt`` are fixed paths (links) to them.
* ``wandb`` with ``mode: offline`` writes the run under ``<out>/wandb`` (``wandb sync`` uploads
  it later); leave ``mode`` out to log online.

Run:  python examples/from_other_trainers/minds_style.py [--epochs 8] [--no-wandb]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from zae_trainer import from_config  # noqa: E402


def make_model(hidden: int = 32, classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def make_loaders(batch_size: int, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    centres = 1.5 * torch.randn(4, 6, generator=g)
    y = torch.randint(0, 4, (600,), generator=g)
    x = centres[y] + torch.randn(600, 6, generator=g)
    train = TensorDataset(x[:480], y[:480])
    valid = TensorDataset(x[480:], y[480:])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)),
        DataLoader(valid, batch_size=120),
    )


def make_config(out: str, epochs: int, use_wandb: bool) -> dict[str, Any]:
    """The whole run as one dict, as a MINDS config (a YAML file with these keys works too)."""
    addons: list[dict[str, Any]] = [
        {"name": "state_manager", "save_path": os.path.join(out, "ckpt"), "keep_top_k": 3, "keep_last": 1,
         "save_last": True},
    ]
    if use_wandb:
        addons.append({"name": "wandb", "project": "minds-style", "mode": "offline", "dir": out})
    return {
        "model": make_model,  # a class or factory (or an import path "package.module:make_model")
        "model_args": {"hidden": 32},
        "optimizer": {"name": "Adam", "lr": 3e-3},
        "scheduler": {"name": "StepLR", "step_size": 4, "gamma": 0.5},
        "loss": {"name": "cross_entropy", "label_smoothing": 0.05},
        "addons": addons,
        "trainer": {"device": "cpu", "monitor": "valid/loss", "monitor_mode": "min", "log_bar": False},
        "run": {"n_epoch": epochs},
        "config": {"experiment": "minds-style", "batch_size": 32},  # recorded by W&B and in checkpoints
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--no-wandb", action="store_true", help="run without Weights & Biases")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="minds-style-")
    use_wandb = not args.no_wandb and importlib.util.find_spec("wandb") is not None
    if not args.no_wandb and not use_wandb:
        print("wandb is not installed: running without it (pip install wandb)")

    torch.manual_seed(0)
    config = make_config(out, args.epochs, use_wandb)
    trainer = from_config(config)
    train, valid = make_loaders(config["config"]["batch_size"])
    trainer.run(config["run"]["n_epoch"], train, valid)

    with open(os.path.join(out, "ckpt", "manifest.json")) as f:
        manifest = json.load(f)
    kept = sorted(manifest["checkpoints"], key=lambda c: c["value"])
    print(f"kept {len(kept)} checkpoint(s) in {os.path.join(out, 'ckpt')}:")
    for entry in kept:
        marks = [m for m in ("best", "latest") if manifest[m] == entry["name"]]
        print(f"  {entry['name']}  valid/loss {entry['value']:.4f}  {' '.join(marks)}")
    for link in ("best.ckpt", "last.ckpt"):
        print(f"  {link} -> {os.path.basename(os.path.realpath(os.path.join(out, 'ckpt', link)))}")
    return {"trainer": trainer, "manifest": manifest, "out": out, "wandb": use_wandb}


if __name__ == "__main__":
    main()
