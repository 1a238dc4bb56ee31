"""Helpers of :class:`~zae_trainer.addons.multi_gpu.MultiGPUAddon`, one job per module.

* :mod:`.env` — where this process stands: launched by ``torchrun`` / ``accelerate launch``,
  spawned by the trainer, or alone; its rank, world size, device and backend.
* :mod:`.sampler` — rebuilding a user's ``DataLoader`` around a ``DistributedSampler``.
* :mod:`.spawn` — the trainer starting one process per device itself, and bringing the
  trained state back to the caller's trainer.
"""

from __future__ import annotations

from .env import choose_backend, current_rank, current_world_size, launched_externally, local_rank
from .sampler import UnpaddedDistributedSampler, distribute_loader, distributed_sampler_of
from .spawn import DistributedWorkerError

__all__ = [
    "DistributedWorkerError",
    "UnpaddedDistributedSampler",
    "choose_backend",
    "current_rank",
    "current_world_size",
    "distribute_loader",
    "distributed_sampler_of",
    "launched_externally",
    "local_rank",
]
