"""A tiny, deterministic training setup: ``nn.Linear(3, 1)`` on 48 seeded samples."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..trainer import Trainer

__all__ = ["TinyRegressionTrainer", "tiny_loader", "tiny_trainer"]


class TinyRegressionTrainer(Trainer):
    """Least squares; reports ``loss`` and ``mae`` (both stay on the device)."""

    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        out = self.model(x)
        return {"loss": nn.functional.mse_loss(out, y), "mae": (out - y).abs().mean().detach()}

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self.train_step(batch)


def tiny_loader(n: int = 48, batch_size: int = 8, seed: int = 0, shuffle: bool = False) -> DataLoader:
    """A seeded regression data set; shuffling uses its own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g)
    generator = torch.Generator().manual_seed(seed + 1) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


def tiny_trainer(cls: type = TinyRegressionTrainer, *, lr: float = 0.05, seed: int = 0, **settings: Any) -> Any:
    """``cls`` around a freshly seeded ``nn.Linear(3, 1)`` and SGD, quiet by default."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    settings.setdefault("log_bar", False)
    settings.setdefault("handle_signals", False)
    settings.setdefault("log_every_n_steps", 2)
    return cls(model, "cpu", "train", torch.optim.SGD(model.parameters(), lr=lr), None, **settings)
