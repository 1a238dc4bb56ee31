"""torchmetrics under DDP: two real gloo processes, each holding half the data, report the F1
score of the whole set (torchmetrics gathers its state from every rank before computing)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddp_helpers import fast_start_method
from zae_trainer import Trainer
from zae_trainer.addons.multi_gpu import MultiGPUAddon
from zae_trainer.metrics import MetricAccumulator

torchmetrics = pytest.importorskip("torchmetrics")
from torchmetrics.classification import MulticlassF1Score  # noqa: E402
from torchmetrics.functional.classification import multiclass_f1_score  # noqa: E402


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


class F1Trainer(Trainer):
    """Module level, so that spawned workers can import it."""

    def __init__(self, model: nn.Module, device: Any = None, **settings: Any) -> None:
        super().__init__(model, device, **settings)
        self.valid_f1 = MulticlassF1Score(3, average="macro", validate_args=False).to(self.device)

    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.cross_entropy(self.model(x), y)}

    def test_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        logits = self.model(x)
        self.valid_f1.update(logits, y)
        return {"loss": nn.functional.cross_entropy(logits, y), "f1": self.valid_f1}


@pytest.mark.slow
def test_a_torchmetric_is_global_across_ranks() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    trainer = F1Trainer.add_on(MultiGPUAddon)(
        model, "cpu", optimizer=torch.optim.SGD(model.parameters(), lr=0.5), log_bar=False, handle_signals=False,
        world_size=2, collective_timeout=60.0, start_method=fast_start_method(),
    )
    valid = _data(40, seed=1)  # 20 samples per rank, 5 batches of 4 each
    trainer.run(2, DataLoader(_data(64, seed=0), batch_size=8), DataLoader(valid, batch_size=4))
    x, y = valid.tensors
    with torch.no_grad():
        whole = float(multiclass_f1_score(trainer.model(x), y, num_classes=3, average="macro"))
        halves = [
            float(multiclass_f1_score(trainer.model(x[r::2]), y[r::2], num_classes=3, average="macro"))
            for r in range(2)
        ]
    assert trainer.epoch_metrics["valid/f1"] == pytest.approx(whole, abs=1e-6)
    assert all(abs(h - whole) > 1e-4 for h in halves)  # one rank's share alone would be visibly different


def _rank_computes(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank: update a metric with this rank's share of the data, compute through the accumulator."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        x, y = _data(40, seed=1).tensors
        logits = nn.Linear(5, 3).requires_grad_(False)(x)  # the same model on every rank (seeded below)
        metric = MulticlassF1Score(3, average="macro", validate_args=False)
        accumulator = MetricAccumulator("valid")
        for start in range(rank * 4, 40, 4 * world_size):  # round-robin batches of 4, as a sampler shards
            metric.update(logits[start : start + 4], y[start : start + 4])
            accumulator.add({"f1": metric}, 4, 1)
        Path(out, f"{rank}.txt").write_text(repr(accumulator.compute_metrics()["f1"]))
    finally:
        dist.destroy_process_group()


def _entry(rank: int, world_size: int, port: int, out: str) -> None:
    torch.manual_seed(0)
    _rank_computes(rank, world_size, port, out)


@pytest.mark.slow
def test_the_accumulator_computes_a_global_torchmetric_in_a_process_group(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Not "fork": earlier tests leave threads (loggers' services, OpenMP pools) whose locks a
    # forked child inherits held; it crashed with SIGSEGV once in CI.
    context = multiprocessing.get_context(fast_start_method())
    workers = [context.Process(target=_entry, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    values = [float((tmp_path / f"{r}.txt").read_text()) for r in range(2)]

    torch.manual_seed(0)
    x, y = _data(40, seed=1).tensors
    logits = nn.Linear(5, 3).requires_grad_(False)(x)
    whole = float(multiclass_f1_score(logits, y, num_classes=3, average="macro"))
    shares = [
        torch.cat([torch.arange(s, s + 4) for s in range(r * 4, 40, 8)]) for r in range(2)
    ]
    alone = [float(multiclass_f1_score(logits[i], y[i], num_classes=3, average="macro")) for i in shares]
    assert values == pytest.approx([whole, whole], abs=1e-6)  # every rank: the whole set's F1
    assert all(abs(a - whole) > 1e-4 for a in alone)  # not what one rank's share gives
