"""Per-step overhead of the trainer against a hand-written PyTorch loop.

The workload is chosen so that framework overhead dominates: a tiny MLP, batch 32, data
already in memory as a list of tensors, one thread. Every contender trains the same model
(same seed, same data order) for the same number of steps, interleaved round by round so
that machine noise hits all of them alike. The table reports the median time per step, and
the ratios from each contender's best round (as ``timeit`` does: on a shared machine noise only
ever adds time, so the fastest round is the closest to the code's own cost).

Contenders:
  raw loop          : zero_grad / forward / backward / step, nothing else
  raw loop + loss   : the same, also keeping an epoch loss sum on the device (what the trainer
                      does for its metrics; the honest like-for-like baseline)
  zae_trainer       : Trainer subclass, log_bar=False, log_every_n_steps=50
  raw loop + loss + clip    : the like-for-like loop with clip_grad_norm_ and the norm kept too
  zae_trainer + 2 add-ons   : GradientClippingAddon (norm logged) and ThroughputMonitorAddon:
                              the same work, plus what dispatching events to add-ons costs
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


def bench_raw(data: InMemoryBatches, track_loss: bool, clip: bool = False) -> float:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    total = torch.zeros(())
    norms = torch.zeros(())
    model.train()
    start = time.perf_counter()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if clip:
            norms.add_(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        if track_loss:
            total.add_(loss.detach(), alpha=x.shape[0])
    elapsed = time.perf_counter() - start
    float(total), float(norms)  # one read at "epoch end"
    return elapsed


class _BenchTrainer(Trainer):
    loss_fn = nn.CrossEntropyLoss()

    def train_step(self, batch):
        x, y = batch
        return {"loss": self.loss_fn(self.model(x), y)}

    def test_step(self, batch):
        return self.train_step(batch)


def bench_zae(data: InMemoryBatches, with_addons: bool = False) -> float:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cls: type[Trainer] = _BenchTrainer
    if with_addons:
        from zae_trainer.addons import GradientClippingAddon, ThroughputMonitorAddon

        cls = _BenchTrainer.add_on(GradientClippingAddon(max_norm=1.0), ThroughputMonitorAddon())
    trainer = cls(model, "cpu", "train", opt, None, log_bar=False, handle_signals=False)
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
        "raw loop + loss + clip": lambda: bench_raw(data, track_loss=True, clip=True),
        "zae_trainer + 2 add-ons": lambda: bench_zae(data, with_addons=True),
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
    best = {name: min(samples) / args.steps for name, samples in times.items() if samples}
    # each contender against the hand-written loop doing the same work
    twin = {"zae_trainer + 2 add-ons": "raw loop + loss + clip", "raw loop + loss + clip": "raw loop + loss + clip"}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, 1 thread; {args.steps} steps x {args.rounds} rounds")
    print(f"{'contender':<24} {'median us/step':>15} {'best us/step':>13} {'vs raw':>8} {'vs same work':>13}")
    for name, samples in times.items():
        if not samples:
            print(f"{name:<24} {'(not installed)':>15}")
            continue
        median = statistics.median(samples) / args.steps
        same = best[name] / best[twin.get(name, "raw loop + loss sum")]
        print(
            f"{name:<24} {median * 1e6:15.1f} {best[name] * 1e6:13.1f} {best[name] / best['raw loop']:7.3f}x "
            f"{same:12.3f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
