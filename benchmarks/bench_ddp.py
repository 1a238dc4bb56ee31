"""Overhead of MultiGPUAddon against raw DistributedDataParallel, in one process.

What it answers: does the add-on's DDP path cost more per step than DDP itself? All four
contenders train the same model on the same in-memory batches, interleaved round by round
so machine noise hits them alike; the table reports the median time per step.

  raw                 : zero_grad / forward / backward / step, no DDP
  raw DDP             : the same loop around DistributedDataParallel(model)
  zae_trainer         : a Trainer subclass, no add-on
  zae_trainer + DDP   : the same trainer with MultiGPUAddon, inside the same process group
                        (the add-on wraps the model in DDP at run() and unwraps it after)

The process group has one rank, so the all-reduce is DDP's own machinery without network
time: what remains is exactly the wrapper and bookkeeping overhead being compared.

On a CUDA machine it uses the GPU and NCCL (the measurement this benchmark is for). Without
one it runs the same comparison on the CPU with gloo and labels the table so; those numbers
say nothing about GPU overhead.

Run:  python benchmarks/bench_ddp.py [--steps 300] [--rounds 5] [--hidden 1024] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from zae_trainer import Trainer  # noqa: E402
from zae_trainer.addons.distributed.env import free_port  # noqa: E402
from zae_trainer.addons.multi_gpu import MultiGPUAddon  # noqa: E402

IN, OUT = 256, 10


def make_model(hidden: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, OUT)).to(device)


class Batches:
    """Pre-built batches already on the device: no data loading in the timing."""

    def __init__(self, steps: int, batch: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(1)
        self.items = [
            (torch.randn(batch, IN, generator=g).to(device), torch.randint(0, OUT, (batch,), generator=g).to(device))
            for _ in range(steps)
        ]

    def __iter__(self) -> Any:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class Classifier(Trainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.cross_entropy(self.model(x), y)}

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self.train_step(batch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_loop(data: Batches, hidden: int, device: torch.device, ddp: bool) -> float:
    model = make_model(hidden, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if ddp:
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    total = torch.zeros((), device=device)
    _sync(device)
    start = time.perf_counter()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        total.add_(loss.detach(), alpha=x.shape[0])  # what the trainer keeps for its metrics
    _sync(device)
    return time.perf_counter() - start


def trainer_loop(data: Batches, hidden: int, device: torch.device, ddp: bool) -> float:
    model = make_model(hidden, device)
    cls = Classifier.add_on(MultiGPUAddon) if ddp else Classifier
    trainer = cls(model, device, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), log_bar=False,
                  handle_signals=False, log_every_n_steps=50)
    _sync(device)
    start = time.perf_counter()
    trainer.run(1, data)
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend, label = "nccl", f"GPU ({torch.cuda.get_device_name(device)}), NCCL"
    else:
        torch.set_num_threads(1)
        backend, label = "gloo", "CPU with gloo -- NOT the GPU measurement this benchmark is for"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(minutes=5))
    try:
        data = Batches(args.steps, args.batch, device)
        contenders: dict[str, Callable[[], float]] = {
            "raw": lambda: raw_loop(data, args.hidden, device, ddp=False),
            "raw_DDP": lambda: raw_loop(data, args.hidden, device, ddp=True),
            "zae_trainer": lambda: trainer_loop(data, args.hidden, device, ddp=False),
            "zae_trainer+DDP": lambda: trainer_loop(data, args.hidden, device, ddp=True),
        }
        for run in contenders.values():  # warm-up: kernels, allocator, first DDP construction
            run()
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, run in contenders.items():
                times[name].append(run() / args.steps)
    finally:
        dist.destroy_process_group()
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"# {label}; torch {torch.__version__}, Python {platform.python_version()}; "
          f"{args.steps} steps x {args.rounds} rounds, batch {args.batch}, hidden {args.hidden}")
    print(f"{'contender':<18} {'us/step':>10} {'vs raw DDP':>11}")
    for name, value in med.items():
        print(f"{name:<18} {value * 1e6:>10.1f} {value / med['raw_DDP']:>10.3f}x")
    overhead = med["zae_trainer+DDP"] / med["raw_DDP"] - 1
    wrapper = (med["zae_trainer+DDP"] - med["zae_trainer"]) - (med["raw_DDP"] - med["raw"])
    print(f"add-on + trainer overhead vs raw DDP: {overhead * 100:+.1f}%; "
          f"DDP cost inside the trainer minus DDP cost in the raw loop: {wrapper * 1e6:+.1f} us/step")


if __name__ == "__main__":
    main()
