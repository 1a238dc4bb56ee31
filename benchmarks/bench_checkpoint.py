"""Checkpoint save/load throughput against the disk's own bandwidth, and the save stall.

One run measures, on the same disk and the same ~100M-parameter fp32 state (400 MB):

  dd (fdatasync)            raw sequential write bandwidth: ``dd if=/dev/zero bs=16M conv=fdatasync``
  torch.save + fsync        plain ``torch.save`` of the state dict, then fsync (durable, like ours)
  torch.save (page cache)   plain ``torch.save`` without fsync: returns before the data is on disk
  zae ckpt save             StateManagerAddon.save_state(), save_format="ckpt" (temp file, fsync,
                            rename, manifest)
  zae safetensors save      the same with save_format="safetensors"
  zae ckpt save + rotate    ckpt with keep_last=1: each save also deletes the previous file
                            (the steady state of a long run)
  ... load                  torch.load(weights_only=True), safetensors load_file, and the state
                            manager's readers. The page cache is warm, so these are memory reads;
                            safetensors maps the file and reads pages when first touched, so its
                            time is mostly deferred to first use.

and the training-loop stall of one save: how long ``save_state()`` keeps the loop waiting,
synchronous vs ``async_save=True`` (where the loop only pays for copying tensors to fresh CPU
memory, and a background thread writes).

Each contender runs ``--repeats`` times, interleaved; the table shows the median.

Run:  python benchmarks/bench_checkpoint.py [--params-m 100] [--repeats 3] [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from zae_trainer import Trainer  # noqa: E402
from zae_trainer.addons import StateManagerAddon  # noqa: E402
from zae_trainer.addons.checkpoint.formats import read_checkpoint  # noqa: E402

WIDTH = 2048  # each layer: 2048 x 2048 weights + bias = 4.2M parameters


class Regression(Trainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        return {"loss": self.model(batch[0]).square().mean()}

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self.train_step(batch)


def make_model(params_m: float) -> nn.Module:
    layers = max(1, round(params_m * 1e6 / (WIDTH * WIDTH + WIDTH)))
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def timed(fn: Callable[[], Any]) -> float:
    os.sync()  # no contender pays for the previous one's dirty pages being written back
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dd_seconds(folder: str, nbytes: int) -> float:
    target = os.path.join(folder, "dd.bin")
    count = max(1, nbytes // (16 << 20))
    seconds = timed(lambda: subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "conv=fdatasync"],
        check=True, capture_output=True,
    ))
    os.remove(target)
    return seconds * nbytes / (count * (16 << 20))


def make_trainer(model: nn.Module, folder: str, fmt: str, async_save: bool = False, keep_last: int = 10**6) -> Any:
    return Regression.add_on(StateManagerAddon)(
        model, "cpu", "train", torch.optim.SGD(model.parameters(), lr=0.01), None,
        save_path=folder, save_format=fmt, keep_last=keep_last, keep_top_k=0, async_save=async_save,
        log_bar=False, handle_signals=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-m", type=float, default=100.0, help="model size in millions of parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder here)")
    args = parser.parse_args(argv)

    root = tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir or os.getcwd())
    try:
        model = make_model(args.params_m)
        nbytes = state_bytes(model)
        trainers = {fmt: make_trainer(model, os.path.join(root, fmt), fmt) for fmt in ("ckpt", "safetensors")}
        rotating = make_trainer(model, os.path.join(root, "rotating"), "ckpt", keep_last=1)
        rotating.save_state()  # from now on, every save also deletes the previous file
        async_trainer = make_trainer(model, os.path.join(root, "async"), "ckpt", async_save=True, keep_last=1)
        plain = os.path.join(root, "plain.pt")

        def torch_save(sync: bool) -> None:
            torch.save(model.state_dict(), plain)
            if sync:
                fsync_file(plain)

        saves: dict[str, list[float]] = {k: [] for k in (
            "dd (fdatasync)", "torch.save + fsync", "torch.save (page cache)", "zae ckpt save", "zae safetensors save", "zae ckpt save + rotate")}
        loads: dict[str, list[float]] = {k: [] for k in (
            "torch.load weights_only", "zae ckpt load", "safetensors load_file", "zae safetensors load")}
        stall: dict[str, list[float]] = {"sync save (ckpt)": [], "async save (ckpt)": []}
        for _ in range(args.repeats):
            saves["dd (fdatasync)"].append(dd_seconds(root, nbytes))
            saves["torch.save + fsync"].append(timed(lambda: torch_save(True)))
            saves["torch.save (page cache)"].append(timed(lambda: torch_save(False)))
            paths = {}
            for fmt, trainer in trainers.items():
                seconds = timed(lambda t=trainer, f=fmt: paths.__setitem__(f, t.save_state()))
                saves[f"zae {fmt} save"].append(seconds)
            saves["zae ckpt save + rotate"].append(timed(rotating.save_state))
            loads["torch.load weights_only"].append(timed(lambda: torch.load(plain, weights_only=True)))
            loads["zae ckpt load"].append(timed(lambda: read_checkpoint(paths["ckpt"])))
            from safetensors.torch import load_file

            st_model = os.path.join(paths["safetensors"], "model.safetensors")
            loads["safetensors load_file"].append(timed(lambda: load_file(st_model)))
            loads["zae safetensors load"].append(timed(lambda: read_checkpoint(paths["safetensors"])))
            stall["sync save (ckpt)"].append(saves["zae ckpt save"][-1])
            stall["async save (ckpt)"].append(timed(async_trainer.save_state))
            async_trainer.wait_for_checkpoint()  # let it finish before the next round
            os.remove(plain)
            for path in paths.values():  # keep the disk from filling; not timed
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

        mb = nbytes / 1e6
        disk = statistics.median(saves["dd (fdatasync)"])
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
              f"state: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters = {mb:.0f} MB; "
              f"folder: {root}; median of {args.repeats}")
        print(f"{'save':<26} {'seconds':>8} {'MB/s':>8} {'vs dd':>7}")
        for name, values in saves.items():
            sec = statistics.median(values)
            print(f"{name:<26} {sec:8.3f} {mb / sec:8.0f} {disk / sec:6.2f}x")
        print(f"{'load (warm page cache)':<26} {'seconds':>8} {'MB/s':>8}")
        for name, values in loads.items():
            sec = statistics.median(values)
            print(f"{name:<26} {sec:8.3f} {mb / sec:8.0f}")
        sync_s = statistics.median(stall["sync save (ckpt)"])
        print(f"{'loop stall per save':<26} {'seconds':>8} {'vs sync':>8}")
        for name, values in stall.items():
            sec = statistics.median(values)
            print(f"{name:<26} {sec:8.3f} {sec / sync_s:7.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
