"""zae-engine's ``MultiGPUAddon`` used as zae-engine's own ``test_mpu.py`` uses it, on two CPU processes.

zae-engine's test builds ``class MultiGPUTrainer(Trainer.add_on(MultiGPUAddon))``, constructs it
with ``device=[...]`` and an ``init_method`` URL, and calls ``run(n_epoch=2, loader=...)``; it
needs two GPUs. Here the same code runs with two CPU devices, so two real processes train over
gloo. What must hold: the two ranks together train exactly like one process with twice the
batch; zae-engine's per-batch ``logging()`` and ``metric_on_epoch_end()`` run in each worker on
its own share of the data; the compat state manager writes zae-engine's folder once (rank 0);
and, unlike zae-engine (whose parent trainer stayed untrained after ``mp.spawn``), the caller's
trainer holds the result.
"""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ddp_helpers import fast_start_method, loader
from zae_trainer.addons.distributed.env import free_port
from zae_trainer.compat import Trainer
from zae_trainer.compat.addons import MultiGPUAddon, StateManagerAddon

pytestmark = pytest.mark.slow


class Regression(Trainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model(x), y)}

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self.train_step(batch)

    def metric_on_epoch_end(self) -> dict[str, float]:
        log = self.log_train if self.mode == "train" else self.log_test
        return {"batches": float(len(log["loss"]))}  # what this process's logging() saw


class MultiGPUTrainer(Regression.add_on(MultiGPUAddon)):  # module level: spawned workers import it
    pass


def _parts() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.timeout(180)
def test_zae_engine_multi_gpu_usage_on_two_gloo_processes_trains_like_one_process(tmp_path: Path) -> None:
    model, optimizer, scheduler = _parts()
    trainer = MultiGPUTrainer.add_on(StateManagerAddon)(
        model=model,
        device=[torch.device("cpu"), torch.device("cpu")],
        optimizer=optimizer,
        scheduler=scheduler,
        init_method=f"tcp://127.0.0.1:{free_port()}",
        save_path=str(tmp_path / "ddp"),
        log_bar=False,
        handle_signals=False,
        start_method=fast_start_method(),
        collective_timeout=60.0,
    )
    assert trainer.world_size == 1 and trainer.addon_of(MultiGPUAddon).planned_world_size() == 2
    trainer.run(n_epoch=2, loader=loader(48, batch_size=8), valid_loader=loader(32, batch_size=8, seed=7))

    ref_model, ref_optimizer, ref_scheduler = _parts()
    reference = Regression.add_on(StateManagerAddon)(
        ref_model, torch.device("cpu"), "train", ref_optimizer, ref_scheduler,
        save_path=str(tmp_path / "one"), log_bar=False, handle_signals=False,
    )
    reference.run(n_epoch=2, loader=loader(48, batch_size=16), valid_loader=loader(32, batch_size=16, seed=7))

    # The caller's trainer holds rank 0's result: the same weights as one process, batch 16.
    for name, value in _weights(reference.model).items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert trainer.progress_checker.epoch == 2 and trainer.progress_checker.step == reference.progress_checker.step == 6
    assert trainer.scheduler.get_last_lr() == pytest.approx([0.05 * 0.5**2])
    assert not isinstance(trainer.model, nn.parallel.DistributedDataParallel)
    # Each rank's logging() saw its own 3 of the 6 batches (per phase: 24 and 16 samples); the
    # epoch metrics are averaged over the ranks, and the losses match one process.
    for epoch in trainer.history:
        assert epoch["train/batches"] == 3.0 and epoch["valid/batches"] == 2.0
    for name in ("train/loss", "valid/loss"):
        assert [h[name] for h in trainer.history] == pytest.approx([h[name] for h in reference.history], rel=1e-5)
    # zae-engine's folder, written by rank 0 alone at each improving epoch, holds the best weights.
    assert trainer.best["epoch"] == reference.best["epoch"]
    assert sorted(os.listdir(tmp_path / "ddp")) == ["model.ckpt", "optimizer.zae", "scheduler.zae"]
    saved = torch.load(tmp_path / "ddp" / "model.ckpt", weights_only=True)
    expected = torch.load(tmp_path / "one" / "model.ckpt", weights_only=True)
    assert saved.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-6)
    # Nothing the launch left behind keeps the trainer alive: del frees it by reference counting.
    watched = [weakref.ref(o) for o in (trainer, *trainer.addon_instances)]
    gc.disable()
    try:
        del trainer
        assert [ref() for ref in watched] == [None] * len(watched)
    finally:
        gc.enable()
