"""MultiGPUAddon: two gloo CPU processes train exactly like one process with twice the batch.

Distributed runs spawn real processes (about 5-10 s each on a small machine); each test is
bounded by a timeout. Tests that need no second process check the pieces in-process.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ddp_helpers import RankRecorder, SetEpoch, ddp_trainer, loader, params, read_records, regression_data
from zae_trainer import TrainerConfigError
from zae_trainer.addons.clipping import GradientClippingAddon
from zae_trainer.addons.distributed import UnpaddedDistributedSampler, distribute_loader
from zae_trainer.addons.multi_gpu import MultiGPUAddon
from zae_trainer.testing.tiny import TinyRegressionTrainer

pytestmark = pytest.mark.slow


def _assert_params_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
def test_two_gloo_ranks_with_batch_b_equal_one_process_with_batch_2b() -> None:
    trainer = ddp_trainer(MultiGPUAddon, world_size=2)
    trainer.run(2, loader(48, batch_size=4), loader(20, batch_size=4, seed=7))

    reference = ddp_trainer()
    reference.run(2, loader(48, batch_size=8), loader(20, batch_size=8, seed=7))

    # The caller's trainer holds the workers' result: weights, progress, metrics, summary.
    _assert_params_close(params(trainer), params(reference))
    assert trainer.progress_checker.step == reference.progress_checker.step == 12
    assert trainer.progress_checker.epoch == 2
    assert set(trainer.epoch_metrics) == set(reference.epoch_metrics)
    for name, value in reference.epoch_metrics.items():
        assert trainer.epoch_metrics[name] == pytest.approx(value, rel=1e-5), name
    assert len(trainer.history) == 2
    assert trainer.summary.status == "finished"
    assert trainer.summary.final_metrics == trainer.epoch_metrics
    assert trainer.best["epoch"] == reference.best["epoch"]
    assert not isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)


@pytest.mark.timeout(120)
def test_shuffle_accumulation_and_clipping_match_one_process(tmp_path) -> None:
    record_dir = str(tmp_path / "records")
    trainer = ddp_trainer(
        MultiGPUAddon, RankRecorder, GradientClippingAddon, world_size=2, accumulate_grad_batches=2, max_norm=0.5,
        record_dir=record_dir,
    )
    trainer.run(2, loader(48, batch_size=4, shuffle=True))

    # One process sees, per step, the union of both ranks' batches: the same permutation
    # (seed = the loader generator's seed, reshuffled by epoch), batch 2B.
    data = regression_data(48)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=1)
    reference = ddp_trainer(SetEpoch, GradientClippingAddon, accumulate_grad_batches=2, max_norm=0.5)
    reference.run(2, DataLoader(data, batch_size=8, sampler=sampler))

    _assert_params_close(params(trainer), params(reference))
    # Non-final micro-batches of each accumulation group skipped DDP's gradient all-reduce.
    syncs = [r["sync"] for r in read_records(record_dir, 0) if r["event"] == "backward"]
    assert syncs == [False, True] * 6
    assert syncs == [r["sync"] for r in read_records(record_dir, 1) if r["event"] == "backward"]


def test_built_trainer_class_pickles_by_recipe() -> None:
    built = TinyRegressionTrainer.add_on(MultiGPUAddon(world_size=2, collective_timeout=5.0))
    clone = pickle.loads(pickle.dumps(built))
    assert clone.addons == built.addons
    assert clone._zt_specs[0].preset == {"world_size": 2, "collective_timeout": 5.0}


def test_one_process_is_a_no_op() -> None:
    trainer = ddp_trainer(MultiGPUAddon)
    trainer.run(2, loader(24, batch_size=8, shuffle=True))
    reference = ddp_trainer()
    reference.run(2, loader(24, batch_size=8, shuffle=True))
    assert all(torch.equal(a, b) for a, b in zip(params(trainer), params(reference)))
    assert trainer.world_size == 1 and trainer.is_main_process
    assert trainer.epoch_metrics == reference.epoch_metrics


def _collate(batch):  # module level: picklable
    return torch.utils.data.default_collate(batch)


def test_injected_sampler_keeps_the_loader_settings() -> None:
    original = DataLoader(
        regression_data(10), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(42),
        collate_fn=_collate, drop_last=True, num_workers=1, pin_memory=False, persistent_workers=True,
        prefetch_factor=3,
    )
    shards = [distribute_loader(original, rank=r, world_size=2, train=True) for r in range(2)]
    for rank, shard in enumerate(shards):
        sampler = shard.sampler
        assert isinstance(sampler, DistributedSampler) and not isinstance(sampler, UnpaddedDistributedSampler)
        assert (sampler.rank, sampler.num_replicas, sampler.shuffle, sampler.seed) == (rank, 2, True, 42)
        assert shard.batch_size == 3 and shard.drop_last and shard.collate_fn is _collate
        assert shard.num_workers == 1 and shard.persistent_workers and shard.prefetch_factor == 3
        assert shard.generator is original.generator
        assert len(shard) == 1  # 5 samples per rank, drop_last batches of 3
    assert distribute_loader(shards[0], rank=0, world_size=2, train=True) is shards[0]  # already sharded


def test_validation_shards_cover_every_sample_once() -> None:
    data = regression_data(11)
    seen: list[int] = []
    for rank in range(3):
        sampler = UnpaddedDistributedSampler(data, num_replicas=3, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(2)
        indices = list(sampler)
        assert len(indices) == len(sampler)
        seen += indices
    assert sorted(seen) == list(range(11))
    with pytest.raises(TrainerConfigError, match="validation set has 1 sample"):
        distribute_loader(DataLoader(regression_data(1)), rank=0, world_size=2, train=False)


def test_custom_samplers_are_refused_with_a_fix() -> None:
    data = regression_data(8)
    weighted = DataLoader(data, sampler=torch.utils.data.WeightedRandomSampler([1.0] * 8, 8))
    with pytest.raises(TrainerConfigError, match="custom sampler.*To fix"):
        distribute_loader(weighted, rank=0, world_size=2, train=True)
    replacement = DataLoader(data, sampler=RandomSampler(data, replacement=True))
    with pytest.raises(TrainerConfigError, match="replacement"):
        distribute_loader(replacement, rank=0, world_size=2, train=True)


def test_settings_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="world_size"):
        ddp_trainer(MultiGPUAddon, world_size=0)
    with pytest.raises(ValueError, match="backend"):
        ddp_trainer(MultiGPUAddon, backend="tcp")
    with pytest.raises(ValueError, match="collective_timeout"):
        ddp_trainer(MultiGPUAddon, collective_timeout=-1)
    with pytest.raises(TrainerConfigError, match="device_ids"):
        ddp_trainer(MultiGPUAddon, ddp_kwargs={"device_ids": [0]})


def test_unpicklable_arguments_fail_before_any_process_starts() -> None:
    trainer = ddp_trainer(MultiGPUAddon, world_size=2)
    bad = DataLoader(regression_data(8), batch_size=2, collate_fn=lambda b: torch.utils.data.default_collate(b))
    with pytest.raises(TrainerConfigError, match="must pickle.*To fix"):
        trainer.run(1, bad)


def test_conformance_in_one_process(tmp_path) -> None:
    from zae_trainer.testing import check_addon

    report = check_addon(MultiGPUAddon, workdir=tmp_path)
    assert report["sync"] == 0 and report["pickle"] == "ok"


@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_with_nccl_match_one_gpu_with_double_batch() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    trainer = TinyRegressionTrainer.add_on(MultiGPUAddon)(
        model, ["cuda:0", "cuda:1"], "train", torch.optim.SGD(model.parameters(), lr=0.05), log_bar=False,
        handle_signals=False,
    )
    trainer.run(2, loader(48, batch_size=4), loader(20, batch_size=4, seed=7))
    reference = ddp_trainer()
    reference.run(2, loader(48, batch_size=8), loader(20, batch_size=8, seed=7))
    for a, b in zip(params(trainer), params(reference)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert trainer.raw_model.weight.device == torch.device("cuda", 0)
