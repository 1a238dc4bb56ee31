"""Pieces the FSDP tests share. Module level, so spawned workers can import them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zae_trainer import Trainer

__all__ = ["Block", "TinyStack", "StackTrainer", "stack_data", "stack_loader", "stack_trainer", "weights"]


class Block(nn.Module):
    """A residual MLP block: the default shard policy makes each one its own FSDP unit."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class TinyStack(nn.Module):
    """Input layer, a ModuleList of blocks, a head: the shape of a small transformer."""

    def __init__(self, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class StackTrainer(Trainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model(x), y)}

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self.train_step(batch)


def stack_data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(dim=1, keepdim=True).sin() + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def stack_loader(n: int = 32, batch_size: int = 4, seed: int = 0, shuffle: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed + 1) if shuffle else None
    return DataLoader(stack_data(n, seed), batch_size=batch_size, shuffle=shuffle, generator=generator)


def stack_trainer(*addons: Any, lr: float = 0.01, seed: int = 0, **settings: Any) -> Any:
    """A StackTrainer around a freshly seeded TinyStack and Adam; quiet, no signal handlers."""
    cls = StackTrainer.add_on(*addons) if addons else StackTrainer
    torch.manual_seed(seed)
    model = TinyStack()
    settings.setdefault("log_bar", False)
    settings.setdefault("handle_signals", False)
    settings.setdefault("log_every_n_steps", 2)
    if any(getattr(a, "name", None) == "fsdp" for a in addons):
        settings.setdefault("collective_timeout", 60.0)
    return cls(model, "cpu", "train", torch.optim.Adam(model.parameters(), lr=lr), None, **settings)


def weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in trainer.raw_model.state_dict().items()}
