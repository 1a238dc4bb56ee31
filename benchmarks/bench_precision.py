"""Training speed of fp32, fp16 and bf16 through PrecisionMixerAddon, on the same model and data.

On a CUDA device: an MLP large enough for the GPU's matrix units to matter (default 4 layers of
4096, batch 512), each precision trained through the zae_trainer loop for ``--steps`` optimizer
steps per round, rounds interleaved so that clock and thermal drift hit all alike; the device is
synchronised before and after each timed round, never inside it. The table gives the median
time per step, samples/s, the speed-up over fp32, and the last round's mean training loss,
which should agree across precisions to about three digits (a sanity check that each one
trains the same model, not a convergence study: ``tests/test_control_precision.py`` has that).

Without CUDA it says so and runs the CPU comparison instead (a smaller MLP): fp32 against bf16
autocast (and fp16 autocast with GradScaler), which is what ``precision="auto"``'s CPU choice
(fp32) rests on.

Run:  python benchmarks/bench_precision.py [--steps 50] [--rounds 5] [--width 4096] [--batch 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from zae_trainer import Trainer  # noqa: E402
from zae_trainer.addons.precision import PrecisionMixerAddon  # noqa: E402


class Regression(Trainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model(x).float(), y)}

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self.train_step(batch)


def make_model(width: int, depth: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def make_batches(steps: int, batch: int, width: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(width, 1, generator=g) / width**0.5
    out = []
    for _ in range(steps):
        x = torch.randn(batch, width, generator=g)
        out.append((x.to(device), (torch.tanh(x @ w) + 0.05 * torch.randn(batch, 1, generator=g)).to(device)))
    return out


def build(precision: str, width: int, depth: int, device: torch.device, steps: int) -> Any:
    model = make_model(width, depth)
    cls = Regression.add_on(PrecisionMixerAddon(precision=precision))
    return cls(model, device, "train", torch.optim.AdamW(model.parameters(), lr=1e-4), None, log_bar=False,
               handle_signals=False, log_every_n_steps=steps)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--width", type=int, default=None, help="default 4096 on CUDA, 512 on CPU")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=None, help="default 512 on CUDA, 128 on CPU")
    args = parser.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda")
        width, batch = args.width or 4096, args.batch or 512
        precisions = ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    else:
        device = torch.device("cpu")
        width, batch = args.width or 512, args.batch or 128
        precisions = ["fp32", "bf16", "fp16"]
        print(f"no CUDA device: skipping the GPU benchmark and running the CPU comparison instead "
              f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
              f"capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__})")
    print(f"model: {args.depth} x Linear({width}, {width}) + GELU, batch {batch}, AdamW; "
          f"{args.steps} steps x {args.rounds} rounds, median per step")

    batches = make_batches(args.steps, batch, width, device)
    trainers = {p: build(p, width, args.depth, device, args.steps) for p in precisions}
    for trainer in trainers.values():  # warm-up: kernels, allocator, autocast caches
        trainer.run(1, batches[: max(3, args.steps // 10)])
    sync(device)
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for _ in range(args.rounds):
        for precision, trainer in trainers.items():
            sync(device)
            start = time.perf_counter()
            trainer.run(1, batches)
            sync(device)
            times[precision].append((time.perf_counter() - start) / args.steps)

    base = statistics.median(times["fp32"])
    print(f"{'precision':<10} {'ms/step':>9} {'samples/s':>11} {'vs fp32':>8} {'mean loss':>10}")
    for precision in precisions:
        per_step = statistics.median(times[precision])
        loss = trainers[precision].epoch_metrics["train/loss"]
        print(f"{precision:<10} {per_step * 1e3:>9.3f} {batch / per_step:>11.0f} {base / per_step:>7.2f}x {loss:>10.4f}")


if __name__ == "__main__":
    main()
