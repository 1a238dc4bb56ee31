"""Where this process stands in a distributed run.

Three situations, told apart without any global flag:

* **launched** — ``torchrun``, ``python -m torch.distributed.run`` or ``accelerate launch``
  started this process and set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
* **spawned** — the trainer's own ``run()`` started this process (see :mod:`.spawn`), which
  initialised the process group before building the trainer;
* **alone** — neither: one process, world size 1.

Before a process group exists, rank and world size are read from the launcher's
environment, so ``trainer.is_main_process`` is right even while the trainer is being built.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "LAUNCHER_VARIABLES",
    "WorkerContext",
    "choose_backend",
    "current_rank",
    "current_world_size",
    "free_port",
    "group_active",
    "launched_externally",
    "local_rank",
    "worker_context",
    "set_worker_context",
]

#: Environment variables every torch launcher (torchrun, accelerate launch) sets per process.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def group_active() -> bool:
    """Whether a default process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def launched_externally() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process."""
    return all(name in os.environ for name in LAUNCHER_VARIABLES)


def current_rank() -> int:
    """This process's global rank: the process group's, else the launcher's, else 0."""
    if group_active():
        return dist.get_rank()
    if launched_externally():
        return int(os.environ["RANK"])
    return 0


def current_world_size() -> int:
    """The number of processes: the process group's, else the launcher's, else 1."""
    if group_active():
        return dist.get_world_size()
    if launched_externally():
        return int(os.environ["WORLD_SIZE"])
    return 1


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``); 0 when not launched."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def choose_backend(device: torch.device) -> str:
    """``"nccl"`` for CUDA devices (when PyTorch was built with it), ``"gloo"`` otherwise."""
    if device.type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class WorkerContext:
    """What a spawned worker knows before its trainer exists: its rank and its device."""

    rank: int
    world_size: int
    devices: Sequence[torch.device]

    @property
    def device(self) -> torch.device:
        return self.devices[self.rank]


_context: WorkerContext | None = None


def worker_context() -> WorkerContext | None:
    """The context of the spawned worker this process is, or None."""
    return _context


def set_worker_context(context: WorkerContext | None) -> None:
    """Set (or clear) this process's worker context; only :mod:`.spawn` calls it."""
    global _context
    _context = context
