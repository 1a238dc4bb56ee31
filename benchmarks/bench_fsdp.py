"""FSDP against DDP at two ranks: memory per rank, and DCP checkpoints against single files.

What it answers:

1. **Memory per rank.** The same model (a stack of residual MLP blocks) and Adam, trained a
   few steps with MultiGPUAddon (DDP: every rank holds everything) and with FSDPAddon
   (FSDP2: every rank holds 1/N). Measured on each rank right after an optimizer step, when
   parameters, gradients and optimizer state are all alive, as the bytes of the tensors this
   rank holds (``DTensor`` shards counted by their local part). Transient all-gathered
   parameters of the one block running at a time are not included. On CUDA the peak of
   ``torch.cuda.max_memory_allocated`` is shown too.
2. **Checkpoint time.** The same trained state saved and loaded through StateManagerAddon:
   ``ckpt`` and ``safetensors`` (one process writes everything) and ``dcp`` (one process, and
   two FSDP ranks each writing its shards). Median of ``--repeat`` saves and loads.

Two processes (gloo on the CPU; NCCL when two GPUs are visible) start once and run both
strategies. CPU numbers say how the bytes divide, not how fast a GPU cluster is.

Run:  python benchmarks/bench_fsdp.py [--width 1024] [--depth 8] [--steps 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from zae_trainer import AddOn, Trainer  # noqa: E402
from zae_trainer.addons.distributed.env import free_port  # noqa: E402
from zae_trainer.addons.distributed.fsdp import FSDPAddon  # noqa: E402
from zae_trainer.addons.multi_gpu import MultiGPUAddon  # noqa: E402
from zae_trainer.addons.state_manager import StateManagerAddon  # noqa: E402


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(self.norm(x)))


class Stack(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Regress(Trainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model(x), y)}

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self.train_step(batch)


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


class MemoryProbe(AddOn):
    """Bytes of parameters, gradients and optimizer state this rank holds after an optimizer step."""

    name = "memory_probe"

    def __init__(self) -> None:
        self.grads = 0
        self.found: dict[str, int] = {}

    def on_before_optimizer_step(self, trainer: Any) -> None:
        self.grads = sum(_local_bytes(p.grad) for p in trainer.model.parameters() if p.grad is not None)

    def on_after_optimizer_step(self, trainer: Any) -> None:
        params = sum(_local_bytes(p) for p in trainer.model.parameters())
        state = sum(_local_bytes(v) for s in trainer.optimizer.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor))
        self.found = {"params": params, "grads": self.grads, "optimizer": state}


def _trainer(addon: Any, width: int, depth: int, device: torch.device, **settings: Any) -> Any:
    torch.manual_seed(0)
    model = Stack(width, depth)
    cls = Regress.add_on(addon, MemoryProbe, *settings.pop("extra", ()))
    return cls(model, device, "train", torch.optim.Adam(model.parameters(), lr=1e-3), None, log_bar=False,
               handle_signals=False, **settings)


def _loader(width: int, steps: int, batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * batch, width, generator=g)
    return DataLoader(TensorDataset(x, x.roll(1, dims=1)), batch_size=batch)


def _timed(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        fn()
        if dist.is_initialized():
            dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _checkpoint_times(trainer: Any, repeat: int) -> dict[str, float]:
    manager = trainer.get_addon("state_manager")
    saved: list[str | None] = []
    save = _timed(lambda: saved.append(manager.save_state()), repeat)
    path = saved[-1] if saved[-1] is not None else ""
    if dist.is_initialized():
        shared = [path]
        dist.broadcast_object_list(shared, src=0)
        path = str(shared[0])
    load = _timed(lambda: manager.load_state(path), repeat)
    return {"save": save, "load": load}


def _worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    world = 2
    cuda = torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        report: dict[str, Any] = {}
        for name, addon in (("DDP", MultiGPUAddon), ("FSDP", FSDPAddon)):
            folder = os.path.join(out, name)
            extra = (StateManagerAddon(save_path=folder, save_format="dcp", save_last=False, keep_top_k=0,
                                       keep_last=1),) if name == "FSDP" else ()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            trainer = _trainer(addon, args.width, args.depth, device, extra=extra)
            trainer.run(1, _loader(args.width, args.steps, args.batch))
            entry = dict(trainer.get_addon("memory_probe").found)
            if cuda:
                entry["cuda_peak"] = torch.cuda.max_memory_allocated()
            if name == "FSDP":
                entry["dcp"] = _checkpoint_times(trainer, args.repeat)
            report[name] = entry
        with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
            json.dump(report, fh)
    finally:
        dist.destroy_process_group()


def _single_process(args: argparse.Namespace, out: str) -> dict[str, dict[str, float]]:
    """Save/load times of each format from one process, for the same trained state."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    times = {}
    for fmt in ("ckpt", "safetensors", "dcp"):
        manager = StateManagerAddon(save_path=os.path.join(out, f"single-{fmt}"), save_format=fmt, save_last=False,
                                    keep_top_k=0, keep_last=1)
        torch.manual_seed(0)
        model = Stack(args.width, args.depth)
        trainer = Regress.add_on(manager)(model, device, "train", torch.optim.Adam(model.parameters(), lr=1e-3), None,
                                          log_bar=False, handle_signals=False)
        trainer.run(1, _loader(args.width, args.steps, args.batch))
        times[fmt] = _checkpoint_times(trainer, args.repeat)
    return times


def _mib(n: float) -> str:
    return f"{n / 2**20:9.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="zae-bench-fsdp-") as out:
        mp.start_processes(_worker, args=(args, free_port(), out), nprocs=2, start_method="spawn")
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]
        single = _single_process(args, out)

    cuda = torch.cuda.device_count() >= 2
    params = sum(p.numel() for p in Stack(args.width, args.depth).parameters())
    where = "2 CUDA devices, NCCL" if cuda else "CPU with gloo"
    print(f"FSDP vs DDP, 2 ranks ({where}); {params / 1e6:.2f} M parameters, Adam; torch {torch.__version__}, "
          f"{platform.machine()}, python {platform.python_version()}")
    print(f"{'per rank (max over ranks), MiB':32} {'params':>9} {'grads':>9} {'optim':>9} {'total':>9}"
          + (f" {'cuda peak':>9}" if cuda else ""))
    totals = {}
    for name in ("DDP", "FSDP"):
        worst = {k: max(r[name][k] for r in ranks) for k in ("params", "grads", "optimizer")}
        totals[name] = sum(worst.values())
        row = f"{name:32} {_mib(worst['params'])} {_mib(worst['grads'])} {_mib(worst['optimizer'])} {_mib(totals[name])}"
        if cuda:
            row += f" {_mib(max(r[name]['cuda_peak'] for r in ranks))}"
        print(row)
    print(f"FSDP/DDP per-rank total: {totals['FSDP'] / totals['DDP']:.3f} (1/N = 0.500)")
    print()
    print(f"{'checkpoint (median of ' + str(args.repeat) + '), s':32} {'save':>9} {'load':>9}")
    for fmt in ("ckpt", "safetensors", "dcp"):
        print(f"{fmt + ', 1 process':32} {single[fmt]['save']:9.3f} {single[fmt]['load']:9.3f}")
    dcp2 = ranks[0]["FSDP"]["dcp"]
    print(f"{'dcp, 2 FSDP ranks':32} {dcp2['save']:9.3f} {dcp2['load']:9.3f}")


if __name__ == "__main__":
    main()
