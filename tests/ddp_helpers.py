"""Pieces the distributed tests share. Module level, so spawned workers can import them."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from zae_trainer import AddOn
from zae_trainer.addons.distributed import current_rank
from zae_trainer.testing.tiny import TinyRegressionTrainer, tiny_trainer

__all__ = ["RankRecorder", "FailAt", "SetEpoch", "regression_data", "loader", "ddp_trainer", "params", "read_records"]


def regression_data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def loader(n: int = 48, batch_size: int = 4, seed: int = 0, shuffle: bool = False, **kwargs: Any) -> DataLoader:
    generator = torch.Generator().manual_seed(seed + 1) if shuffle else None
    return DataLoader(regression_data(n, seed), batch_size=batch_size, shuffle=shuffle, generator=generator, **kwargs)


def ddp_trainer(*addons: Any, lr: float = 0.05, **settings: Any) -> Any:
    """A tiny trainer (nn.Linear(3, 1), SGD) with ``addons``; quiet, no signal handlers."""
    cls = TinyRegressionTrainer.add_on(*addons) if addons else TinyRegressionTrainer
    if any(_is_multi_gpu(a) for a in addons):
        settings.setdefault("collective_timeout", 60.0)
        settings.setdefault("start_method", fast_start_method())
    return tiny_trainer(cls, lr=lr, **settings)


_PRELOAD = ["torch.optim", "torch.nn.parallel", "zae_trainer.addons.multi_gpu", "zae_trainer.testing.tiny"]


def fast_start_method() -> str:
    """"forkserver" with torch preloaded: after the first run, workers start in a fraction of
    a second instead of importing torch again (several seconds each on a small machine)."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    return "forkserver"


def _is_multi_gpu(addon: Any) -> bool:
    return getattr(addon, "name", None) == "multi_gpu"


def params(trainer: Any) -> list[torch.Tensor]:
    return [p.detach().cpu().clone() for p in trainer.raw_model.parameters()]


class RankRecorder(AddOn):
    """Appends one JSON line per LOG / EPOCH_END / AFTER_BACKWARD to ``record_dir/rank<r>.jsonl``."""

    name = "rank_recorder"

    def __init__(self, *, record_dir: str) -> None:
        self.record_dir = record_dir

    def _write(self, entry: dict[str, Any]) -> None:
        os.makedirs(self.record_dir, exist_ok=True)
        with open(os.path.join(self.record_dir, f"rank{current_rank()}.jsonl"), "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def on_log(self, trainer: Any, metrics: Any) -> None:
        self._write({"event": "log", "step": trainer.progress_checker.step})

    def on_epoch_end(self, trainer: Any) -> None:
        self._write({"event": "epoch_end", "metrics": dict(trainer.epoch_metrics),
                     "main": trainer.is_main_process, "world": trainer.world_size})

    def on_after_backward(self, trainer: Any) -> None:
        sync = getattr(trainer.model, "require_backward_grad_sync", None)
        self._write({"event": "backward", "sync": sync})


def read_records(record_dir: str, rank: int) -> list[dict[str, Any]]:
    path = os.path.join(record_dir, f"rank{rank}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh]


class FailAt(AddOn):
    """Raises (or hangs) on ``fail_rank`` when training batch ``fail_batch`` (1-based) begins."""

    name = "fail_at"

    def __init__(self, *, fail_rank: int = 1, fail_batch: int = 3, hang_seconds: float = 0.0) -> None:
        self.fail_rank = fail_rank
        self.fail_batch = fail_batch
        self.hang_seconds = hang_seconds

    def on_train_batch_begin(self, trainer: Any) -> None:
        if current_rank() == self.fail_rank and trainer.progress_checker.batches + 1 == self.fail_batch:
            if self.hang_seconds:
                time.sleep(self.hang_seconds)
            raise ValueError(f"boom on rank {self.fail_rank} at batch {self.fail_batch}")


class SetEpoch(AddOn):
    """For single-process references that use a DistributedSampler: set_epoch like MultiGPUAddon."""

    name = "set_epoch"

    def on_epoch_begin(self, trainer: Any) -> None:
        sampler = getattr(trainer.loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(trainer.progress_checker.epoch)


RANK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_scripts", "rank_run.py")
_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def start_ranks(mode: str, out_dir: str, world_size: int = 2, *, slurm: bool = False,
                env_of_rank: Any = None) -> list[Any]:
    """Start ``ddp_scripts/rank_run.py MODE OUT_DIR`` as ``world_size`` real processes, each told
    its rank the way torchrun does (``RANK``...) or, with ``slurm=True``, the way ``srun`` does
    (``SLURM_PROCID``...). No launcher agent stands between them and the test's signals."""
    import subprocess
    import sys

    from zae_trainer.addons.distributed.env import free_port

    base = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES and not k.startswith("SLURM_")}
    base.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MASTER_PORT=str(free_port()))
    procs = []
    for rank in range(world_size):
        env = dict(base)
        if slurm:
            env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world_size), SLURM_LOCALID=str(rank),
                       SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242")
        else:
            env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
        env.update((env_of_rank or {}).get(rank, {}))
        procs.append(subprocess.Popen([sys.executable, RANK_SCRIPT, mode, out_dir], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def rank_report(out_dir: str, rank: int) -> dict[str, Any]:
    with open(os.path.join(out_dir, f"rank{rank}.json")) as fh:
        return json.loads(fh.read())  # type: ignore[no-any-return]
