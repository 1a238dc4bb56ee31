"""Per-step overhead of the trainer against a hand-written PyTorch loop.

The workload is chosen so that framework overhead dominates: a tiny MLP, batch 32, data
already in memory as a list of tensors, one thread. Every contender trains the same model
(same seed, same data order) for the same number of steps, interleaved round by round so
that machine noise hits all of them alike; the table reports the median time per step and the
ratio to the raw loop.

Contenders:
  raw loop          : zero_grad / forward / backward / step, nothing else
  raw loop + loss   : the same, also keeping an epoch loss sum on the device (what the trainer
                      does for its metrics; the honest like-for-like baseline)
  zae_trainer       : Trainer subclass, log_bar=False, log_every_n_steps=50
  lightning / ignite: when the ``bench`` extra is installed

Run:  python benchmarks/bench_overhead.py [--steps 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from zae_trainer import Trainer  # noqa: E402

IN, HIDDEN, OUT, BATCH = 32, 64, 10, 32


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


class InMemoryBatches:
    """Pre-built batches behind a minimal loader interface (a plain list would look like
    "several loaders" to Lightning)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_data(steps: int) -> InMemoryBatches:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * BATCH, IN, generator=g)
    y = torch.randint(0, OUT, (steps * BATCH,), generator=g)
    return InMemoryBatches([(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, steps * BATCH, BATCH)])


def bench_raw(data: InMemoryBatches, track_loss: bool) -> float:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    total = torch.zeros(())
    model.train()
    start = time.perf_counter()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if track_loss:
            total.add_(loss.detach(), alpha=x.shape[0])
    elapsed = time.perf_counter() - start
    float(total)  # one read at "epoch end"
    return elapsed


class _BenchTrainer(Trainer):
    loss_fn = nn.CrossEntropyLoss()

    def train_step(self, batch):
        x, y = batch
        return {"loss": self.loss_fn(self.model(x), y)}

    def test_step(self, batch):
        return self.train_step(batch)


def bench_zae(data: InMemoryBatches) -> float:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = _BenchTrainer(model, "cpu", "train", opt, None, log_bar=False, handle_signals=False)
    start = time.perf_counter()
    trainer.run(1, data)
    return time.perf_counter() - start


def bench_lightning(data: InMemoryBatches) -> float | None:
    try:
        import lightning.pytorch as pl  # type: ignore[import-not-found]
    except ImportError:
        try:
            import pytorch_lightning as pl  # type: ignore[import-not-found, no-redef]
        except ImportError:
            return None
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()
            self.loss_fn = nn.CrossEntropyLoss()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss_fn(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Module()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=data)
        return time.perf_counter() - start


def bench_ignite(data: InMemoryBatches) -> float | None:
    try:
        from ignite.engine import Engine
    except ImportError:
        return None
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def update(engine, batch):
        model.train()
        opt.zero_grad(set_to_none=True)
        x, y = batch
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    engine = Engine(update)
    start = time.perf_counter()
    engine.run(data, max_epochs=1)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = make_data(args.steps)
    contenders: dict[str, Callable[[], float | None]] = {
        "raw loop": lambda: bench_raw(data, track_loss=False),
        "raw loop + loss sum": lambda: bench_raw(data, track_loss=True),
        "zae_trainer": lambda: bench_zae(data),
        "pytorch-lightning": lambda: bench_lightning(data),
        "pytorch-ignite": lambda: bench_ignite(data),
    }
    for fn in contenders.values():  # warm-up round (allocator, imports, lazy init)
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            t = fn()
            if t is not None:
                times[name].append(t)
    base = statistics.median(times["raw loop"]) / args.steps
    base_loss = statistics.median(times["raw loop + loss sum"]) / args.steps
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, 1 thread; {args.steps} steps x {args.rounds} rounds, median")
    print(f"{'contender':<22} {'us/step':>9} {'vs raw':>8} {'vs raw+loss':>12}")
    for name, samples in times.items():
        if not samples:
            print(f"{name:<22} {'(not installed)':>9}")
            continue
        per_step = statistics.median(samples) / args.steps
        print(f"{name:<22} {per_step * 1e6:9.1f} {per_step / base:7.3f}x {per_step / base_loss:11.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
