"""Checkpoint machinery behind :class:`~zae_trainer.addons.state_manager.StateManagerAddon`.

One module per job: :mod:`.schema` (what a checkpoint holds), :mod:`.formats` (ckpt and
safetensors on disk), :mod:`.safetensors_io` (tensor files, tied weights), :mod:`.tree`
(plain values and JSON), :mod:`.atomic` (crash-safe writes), :mod:`.manifest` (latest, best,
retention), :mod:`.rng` (random states), :mod:`.data_position` (mid-epoch resume),
:mod:`.async_writer` (background writes), :mod:`.foreign` (lis2 and plain ``torch.save``
files), :mod:`.errors`.
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
from .foreign import GLOBAL_CONFIG, MODEL, TRAIN_INFO
from .formats import CheckpointFormat, read_checkpoint, read_weights, register_format
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
    "CheckpointFormat",
    "register_format",
    "MODEL",
    "TRAIN_INFO",
    "GLOBAL_CONFIG",
]


def read_snapshot(path: str, layout: str = "zae_trainer") -> dict:
    """A snapshot view of the checkpoint at ``path``; ``layout="lis2"`` gives lis2's keys.

    ``path`` may be one of our checkpoints (either format, any schema version) or a lis2
    snapshot / plain ``torch.save`` dict that holds enough to resume. See :func:`as_snapshot`.

    Examples
    --------
    >>> snap = read_snapshot("ckpts/best.ckpt", layout="lis2")  # doctest: +SKIP
    >>> snap[TRAIN_INFO]["epochs_run"], snap[MODEL]["state"]["fc.weight"].shape  # doctest: +SKIP
    """
    return as_snapshot(read_checkpoint(path, foreign=True), layout)
