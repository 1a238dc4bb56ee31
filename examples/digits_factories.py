"""Model and data factories for config-driven runs on scikit-learn's digits.

Used by ``examples/digits.yaml``::

    zae-trainer fit examples/digits.yaml
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_model(hidden: int = 128, dropout: float = 0.1) -> nn.Module:
    """64 pixels -> ``hidden`` -> 10 classes."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))


def make_data(batch_size: int = 64, seed: int = 0, valid_fraction: float = 0.2) -> tuple[DataLoader, DataLoader]:
    """Stratified, seeded train/validation loaders; pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, valid_idx = train_test_split(
        list(range(len(y))), test_size=valid_fraction, random_state=seed, stratify=digits.target
    )
    train = DataLoader(
        TensorDataset(x[train_idx], y[train_idx]),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    valid = DataLoader(TensorDataset(x[valid_idx], y[valid_idx]), batch_size=256)
    return train, valid
