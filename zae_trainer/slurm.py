"""SLURM: join the tasks ``srun`` started as ranks, or refuse to train N copies side by side.

``srun --ntasks=N python train.py`` starts N processes and tells each who it is through
``SLURM_PROCID`` (global rank), ``SLURM_NTASKS`` / ``SLURM_STEP_NUM_TASKS`` (how many),
``SLURM_LOCALID`` (rank on its node) and ``SLURM_JOB_NODELIST`` (the hosts). Without care
those N processes are N independent single-process trainings writing to one ``save_path``.

* With a distributing add-on (``MultiGPUAddon``, ``FSDPAddon``) and no torch launcher
  variables (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), the tasks join as ranks:
  :func:`join_slurm_tasks` sets those variables from SLURM's, with ``MASTER_ADDR`` the first
  host of the node list and ``MASTER_PORT`` derived from the job id (``10000 + id % 20000``),
  unless already set; the add-on then starts the process group as under ``torchrun``.
* Without one, :func:`refuse_independent_tasks` stops the run with the command to use.

An interactive allocation (``salloc`` shell, job name ``bash`` / ``interactive``) is not
treated as ``srun`` tasks, and a ``torchrun`` started by ``srun`` is left to ``torchrun``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from .errors import TrainerConfigError

__all__ = ["SlurmTasks", "first_host", "slurm_tasks", "join_slurm_tasks", "refuse_independent_tasks"]

_TORCH_LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_DEFAULT_PORT_BASE = 10000


@dataclass(frozen=True)
class SlurmTasks:
    """Where this process stands among the tasks of one ``srun`` step."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, e.g. ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``.

    Handles ranges with zero padding and several bracket groups (``"r[1-2]-n[01-04]"`` ->
    ``"r1-n01"``), without calling ``scontrol``.
    """
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    if not first or first.count("[") != first.count("]"):
        raise TrainerConfigError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR to the first host")
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def slurm_tasks(environ: Mapping[str, str] | None = None) -> SlurmTasks | None:
    """This process's place among ``srun``'s tasks, or None (not SLURM tasks, one task, an
    interactive allocation, or a torch launcher already in charge)."""
    env = os.environ if environ is None else environ
    if all(name in env for name in _TORCH_LAUNCHER) or "SLURM_PROCID" not in env:
        return None
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
    if world <= 1:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    addr = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1")
    job = env.get("SLURM_JOB_ID", "")
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else _DEFAULT_PORT_BASE + (
        int(job) % 20000 if job.isdigit() else 2910
    )
    return SlurmTasks(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", "0")), addr, port)


def join_slurm_tasks() -> SlurmTasks | None:
    """Under ``srun`` with several tasks, set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` from SLURM's variables, so the process group starts
    as under ``torchrun``. Called by the distributing add-ons; does nothing elsewhere."""
    tasks = slurm_tasks()
    if tasks is not None:
        os.environ.update(
            RANK=str(tasks.rank), WORLD_SIZE=str(tasks.world_size), LOCAL_RANK=str(tasks.local_rank),
            MASTER_ADDR=tasks.master_addr, MASTER_PORT=str(tasks.master_port),
        )
    return tasks


def refuse_independent_tasks(world_size: int) -> None:
    """Refuse a one-process trainer in one of several ``srun`` tasks: N copies of the same
    training would write one ``save_path`` side by side."""
    tasks = slurm_tasks()
    if tasks is None or world_size > 1:
        return
    raise TrainerConfigError(
        f"this process is SLURM task {tasks.rank} of {tasks.world_size} (srun started {tasks.world_size} tasks), "
        "but the trainer has no distributing add-on, so the tasks would run independent copies of the same "
        "training, writing to one save_path. To fix, either add MultiGPUAddon (or FSDPAddon), which joins "
        "srun's tasks as ranks (one task per GPU: srun --ntasks-per-node=<GPUs> --gpus-per-task=1 python "
        "train.py), or start one task per node and let torchrun start the processes: srun --ntasks-per-node=1 "
        "torchrun --nnodes=$SLURM_NNODES --nproc-per-node=<GPUs> --rdzv-backend=c10d "
        "--rdzv-endpoint=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):29500 train.py"
    )
