"""MultiGPUAddon: epoch metrics are global, side effects happen once (rank 0)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ddp_helpers import RankRecorder, ddp_trainer, loader, params, read_records
from zae_trainer.addons.multi_gpu import MultiGPUAddon
from zae_trainer.addons.state_manager import StateManagerAddon

pytestmark = pytest.mark.slow


@pytest.mark.timeout(120)
def test_metrics_are_weighted_global_means_and_side_effects_happen_on_rank_0(tmp_path) -> None:
    record_dir = str(tmp_path / "records")
    ckpt_dir = tmp_path / "ckpt"
    # lr=0: the model does not change, so every epoch metric is a plain mean over samples.
    # 12 training samples, batch 5 per rank: each rank runs batches of 5 and 1 (uneven last
    # batch). 11 validation samples, batch 3: ranks hold 6 and 5 samples (3+3 and 3+2).
    trainer = ddp_trainer(
        MultiGPUAddon, RankRecorder, StateManagerAddon,
        lr=0.0, world_size=2, log_every_n_steps=1, record_dir=record_dir, save_path=str(ckpt_dir), keep_last=5,
    )
    trainer.run(2, loader(12, batch_size=5), loader(11, batch_size=3, seed=7))

    model = trainer.raw_model
    with torch.no_grad():
        def mean_loss(n: int, seed: int) -> float:
            x, y = loader(n, seed=seed).dataset.tensors
            return float(torch.nn.functional.mse_loss(model(x), y))
        expected_train, expected_valid = mean_loss(12, 0), mean_loss(11, 7)

    assert trainer.epoch_metrics["train/loss"] == pytest.approx(expected_train, rel=1e-6)
    assert trainer.epoch_metrics["valid/loss"] == pytest.approx(expected_valid, rel=1e-6)

    ranks = [read_records(record_dir, r) for r in (0, 1)]
    epoch_ends = [[e for e in records if e["event"] == "epoch_end"] for records in ranks]
    # Every rank sees the same, global epoch metrics (so early stopping decides alike).
    assert epoch_ends[0] == [
        {**e, "main": True} for e in epoch_ends[1]
    ] and all(not e["main"] and e["world"] == 2 for e in epoch_ends[1])
    assert epoch_ends[0][-1]["metrics"] == trainer.epoch_metrics
    # LOG fires on rank 0 only (loggers, progress); 2 steps per epoch.
    assert [e["step"] for e in ranks[0] if e["event"] == "log"] == [1, 2, 3, 4]
    assert not [e for e in ranks[1] if e["event"] == "log"]
    # Checkpoints are written once (by rank 0), one per epoch, with the unwrapped model.
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    names = sorted(e["name"] for e in manifest["checkpoints"])
    assert names == ["epoch0001-step0000002.ckpt", "epoch0002-step0000004.ckpt"]
    files = [f for f in os.listdir(ckpt_dir) if not os.path.islink(ckpt_dir / f)]  # links name the same files
    assert sorted(files) == sorted([*names, "manifest.json"])


@pytest.mark.timeout(120)
def test_ddp_checkpoint_loads_in_one_process_and_back(tmp_path) -> None:
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    trainer = ddp_trainer(MultiGPUAddon, StateManagerAddon, world_size=2, save_path=str(ddp_dir))
    trainer.run(1, loader(24, batch_size=4))

    single = ddp_trainer(StateManagerAddon, save_path=str(ddp_dir))
    single.load_state("latest")
    assert all(torch.equal(a, b) for a, b in zip(params(single), params(trainer)))
    assert single.progress_checker.step == trainer.progress_checker.step == 3

    # ... and a single-process checkpoint resumes under DDP (2 x batch 4 == 1 x batch 8).
    single = ddp_trainer(StateManagerAddon, save_path=str(single_dir))
    single.run(1, loader(24, batch_size=8))
    resumed = ddp_trainer(MultiGPUAddon, StateManagerAddon, world_size=2, save_path=str(single_dir), resume="latest")
    resumed.run(2, loader(24, batch_size=4))
    reference = ddp_trainer()
    reference.run(2, loader(24, batch_size=8))
    for a, b in zip(params(resumed), params(reference)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert resumed.progress_checker.epoch == 2
