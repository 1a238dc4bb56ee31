"""Checkpoint machinery behind :class:`~zae_trainer.addons.state_manager.StateManagerAddon`.

One module per job: :mod:`.schema` (what a checkpoint holds), :mod:`.formats` (ckpt and
safetensors on disk), :mod:`.safetensors_io` (tensor files, tied weights), :mod:`.tree`
(plain values and JSON), :mod:`.atomic` (crash-safe writes), :mod:`.manifest` (latest, best,
retention), :mod:`.rng` (random states), :mod:`.data_position` (mid-epoch resume),
:mod:`.async_writer` (background writes), :mod:`.errors`.
"""

from __future__ import annotations

from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointUnsafeError,
    CheckpointWriteError,
)
from .formats import read_checkpoint, read_weights
from .schema import FORMAT_VERSION, as_snapshot

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointCorruptError",
    "CheckpointUnsafeError",
    "CheckpointWriteError",
    "CheckpointMismatchError",
    "read_checkpoint",
    "read_weights",
    "as_snapshot",
    "read_snapshot",
]


def read_snapshot(path: str) -> dict:
    """The seed systems' snapshot layout of the checkpoint at ``path`` (see :func:`as_snapshot`)."""
    return as_snapshot(read_checkpoint(path))
