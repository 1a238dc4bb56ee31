"""MultiGPUAddon + StateManagerAddon: a DDP run resumed from a checkpoint, mid-epoch, ends
where the uninterrupted DDP run ended."""

from __future__ import annotations

import json

import pytest
import torch

from ddp_helpers import ddp_trainer, loader, params
from zae_trainer.addons.multi_gpu import MultiGPUAddon
from zae_trainer.addons.state_manager import StateManagerAddon

pytestmark = pytest.mark.slow


def _run(save_path: str, **settings: object) -> object:
    trainer = ddp_trainer(
        MultiGPUAddon, StateManagerAddon, world_size=2, log_every_n_steps=2, save_every_n_steps=2,
        keep_last=100, keep_top_k=0, save_path=save_path, **settings,
    )
    trainer.run(3, loader(48, batch_size=4, shuffle=True), loader(20, batch_size=4, seed=7))
    return trainer


@pytest.mark.timeout(150)
def test_resumed_ddp_run_equals_the_uninterrupted_one(tmp_path) -> None:
    uninterrupted = _run(str(tmp_path / "a"))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    # The step checkpoint 2 batches into the second epoch (per rank: 6 batches per epoch).
    mid_epoch = [e["name"] for e in manifest["checkpoints"] if e["epoch"] == 1 and e["batch_in_epoch"] == 2]
    assert mid_epoch == ["epoch0001-step0000008-batch00002.ckpt"]

    resumed = _run(str(tmp_path / "b"), resume=str(tmp_path / "a" / mid_epoch[0]))

    assert all(torch.equal(a, b) for a, b in zip(params(resumed), params(uninterrupted)))
    assert resumed.progress_checker.state_dict() == uninterrupted.progress_checker.state_dict()
    # Epochs that ran whole after the resume report the same global metrics. (The resumed epoch's
    # train/* means use rank 0's saved partial sums for every rank: estimated, not exact.)
    assert resumed.history[2] == uninterrupted.history[2]
    assert resumed.history[0] == uninterrupted.history[0]
    assert resumed.history[1]["valid/loss"] == uninterrupted.history[1]["valid/loss"]
