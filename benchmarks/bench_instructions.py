"""Per-step cost of the trainer and of each add-on, counted in CPU instructions (callgrind).

Wall-clock timings on a shared VM vary by tens of percent from round to round, more than the
trainer's own per-step cost on a tiny model. Instruction counts do not depend on what else
the machine is doing, so this gives a repeatable measure of the framework's overhead.

Workload (chosen so that framework overhead is as visible as it gets): an MLP 32 -> 64 -> 10,
batch 32, cross-entropy, SGD with momentum 0.9, 128 steps per epoch, data already in memory,
one thread. Each contender trains ``--short`` epochs and, separately, ``--long`` epochs; the
difference of the two counts divided by the extra steps is its cost per step. Construction,
``run()`` start-up and the first epoch's lazy initialisation (a warm-up epoch runs first,
uncounted) cancel out; everything that happens every epoch stays in, amortised over the
epoch's 128 steps: log points, epoch-end metrics, checkpoint saves, log-file writes.

How it counts: each contender runs in a process of its own under ``valgrind
--tool=callgrind``, with instrumentation off until the imports are done; a tiny C helper
compiled on the spot (``valgrind/callgrind.h`` client requests) switches collection on around
each measured run and dumps the count. Counts are made repeatable to the instruction:
``PYTHONHASHSEED=0`` fixes string hashing, address-space randomisation is switched off
(``setarch -R``, where available: object addresses feed ``id()``-based hashes, so dictionary
probing changed by a few thousand instructions per step from run to run), and a fresh
process per contender keeps one contender's heap from shaping the next one's count; the
earlier runs' garbage is collected before each measured run (it is not that run's cost).

Repeatable is not the same as exact: the same code started with its memory laid out
differently (here: a longer environment, which shifts the stack and so the heap's history)
counts a few thousand instructions per step more or less, through malloc's free lists and
dictionary probing. ``--layouts N`` runs every contender in N such layouts and reports the
mean, the range, and each contender's ratio to its twin layout by layout.

Contenders:
  raw loop                  zero_grad / forward / backward / step, nothing else
  raw loop + loss sum       the same, also keeping an epoch loss sum on the device (what the
                            core does for its metrics: the core's twin)
  raw twin of the stack     the same plus clip_grad_norm_ (foreach), a grad-norm sum and a
                            finiteness flag on the device (the per-step add-ons' work)
  core                      a Trainer subclass, log_bar=False, default settings otherwise
  core + <add-on>           one add-on at a time: the per-add-on breakdown
  core + 4 per-step add-ons GradientClippingAddon(max_norm=1), PrecisionMixerAddon("fp32"),
                            NonFiniteGuardAddon("raise"), ThroughputMonitorAddon
  core + full stack         those four, StateManagerAddon (epoch-end saves, ckpt format) and
                            LocalLoggerAddon (metrics.jsonl / csv)

Instructions are not time; read this beside ``bench_overhead.py``, not instead of it.
Needs valgrind, its headers and a C compiler (``apt install valgrind gcc``); about 3 minutes per
contender on one core, two contenders at a time.

Run:  python benchmarks/bench_instructions.py [--short 1] [--long 5] [--only core,raw] [--layouts 3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
IN, HIDDEN, OUT, BATCH, STEPS_PER_EPOCH = 32, 64, 10, 32, 128

#: name -> (kind, add-ons); kind "raw", "loss", "twin" or "core"
CONTENDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "raw loop": ("raw", ()),
    "raw loop + loss sum": ("loss", ()),
    "raw twin of the stack": ("twin", ()),
    "core": ("core", ()),
    "core + gradient_clipping": ("core", ("clipping",)),
    "core + precision_mixer(fp32)": ("core", ("precision",)),
    "core + nonfinite_guard(raise)": ("core", ("guard",)),
    "core + throughput": ("core", ("throughput",)),
    "core + state_manager": ("core", ("state",)),
    "core + local_logger": ("core", ("logger",)),
    "core + 4 per-step add-ons": ("core", ("clipping", "precision", "guard", "throughput")),
    "core + full stack": ("core", ("clipping", "precision", "guard", "throughput", "state", "logger")),
}
#: what each contender is compared with: the hand-written loop doing the same work
TWINS = {"core": "raw loop + loss sum", "core + 4 per-step add-ons": "raw twin of the stack",
         "core + full stack": "raw twin of the stack"}

_HELPER_C = r"""
#include <valgrind/callgrind.h>
void zt_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void zt_zero(void) { CALLGRIND_ZERO_STATS; }
void zt_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void zt_dump(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
"""


# -- the workload ----------------------------------------------------------------------------------
def _workload() -> tuple[Any, Callable[[], Any], list[Any]]:
    import torch
    from torch import nn

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS_PER_EPOCH * BATCH, IN, generator=g)
    y = torch.randint(0, OUT, (STEPS_PER_EPOCH * BATCH,), generator=g)
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    return torch, make_model, batches


class _Batches:
    """In-memory batches behind a loader interface (iterable with a length)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _raw(kind: str, epochs: int, make_model: Callable[[], Any], batches: list[Any]) -> None:
    import torch
    from torch import nn

    model = make_model()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        total = torch.zeros(())
        norms = torch.zeros(())
        finite = torch.ones((), dtype=torch.bool)
        model.train()
        for x, y in batches:
            loss = loss_fn(model(x), y)
            loss.backward()
            if kind == "twin":
                norm = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                norms.add_(norm)
                finite.logical_and_(torch.isfinite(loss.detach() + norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if kind != "raw":
                total.add_(loss.detach(), alpha=x.shape[0])
        float(total), float(norms), bool(finite)  # read once per epoch


def _trainer_class(addons: tuple[str, ...], workdir: str) -> Any:
    from torch import nn

    from zae_trainer import Trainer
    from zae_trainer.addons import (
        GradientClippingAddon,
        LocalLoggerAddon,
        NonFiniteGuardAddon,
        PrecisionMixerAddon,
        StateManagerAddon,
        ThroughputMonitorAddon,
    )

    class BenchTrainer(Trainer):
        loss_fn = nn.CrossEntropyLoss()

        def train_step(self, batch: Any) -> dict[str, Any]:
            x, y = batch
            return {"loss": self.loss_fn(self.model(x), y)}

        def test_step(self, batch: Any) -> dict[str, Any]:
            return self.train_step(batch)

    factories = {
        "clipping": lambda: GradientClippingAddon(max_norm=1.0),
        "precision": lambda: PrecisionMixerAddon(precision="fp32"),
        "guard": lambda: NonFiniteGuardAddon(policy="raise"),
        "throughput": lambda: ThroughputMonitorAddon(),
        "state": lambda: StateManagerAddon(save_path=os.path.join(workdir, "ckpt")),
        "logger": lambda: LocalLoggerAddon(log_dir=os.path.join(workdir, "logs"), tensorboard=False, plot=False),
    }
    return BenchTrainer.add_on(*(factories[a]() for a in addons)) if addons else BenchTrainer


def _core(addons: tuple[str, ...], epochs: int, make_model: Callable[[], Any], batches: list[Any]) -> None:
    import torch

    with tempfile.TemporaryDirectory(prefix="bench-instr-run-") as workdir:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        trainer = _trainer_class(addons, workdir)(model, "cpu", "train", opt, None, log_bar=False)
        trainer.run(epochs, _Batches(batches))


def run_contender(name: str, epochs: int, make_model: Callable[[], Any], batches: list[Any]) -> None:
    kind, addons = CONTENDERS[name]
    if kind == "core":
        _core(addons, epochs, make_model, batches)
    else:
        _raw(kind, epochs, make_model, batches)


# -- the child: runs under callgrind ------------------------------------------------------------------
def _child(names: list[str], short: int, long: int, helper: str | None) -> None:
    torch, make_model, batches = _workload()
    torch.set_num_threads(1)
    import zae_trainer.addons  # noqa: F401  (imports outside the measured region)

    lib = ctypes.CDLL(helper) if helper else None  # without valgrind the requests are no-ops
    if lib is not None:
        lib.zt_start()
    for name in names:
        run_contender(name, 1, make_model, batches)  # warm-up: lazy initialisation, first-call imports
        for epochs in (short, long):
            gc.collect()  # the earlier runs' garbage (trainer classes are cyclic) is not this run's cost
            if lib is not None:
                lib.zt_zero()
                lib.zt_toggle()
            run_contender(name, epochs, make_model, batches)
            if lib is not None:
                lib.zt_toggle()
                lib.zt_dump(f"{name}|{epochs}".encode())


def _compile_helper(folder: str) -> str | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source, library = os.path.join(folder, "zt_callgrind.c"), os.path.join(folder, "libzt_callgrind.so")
    with open(source, "w") as handle:
        handle.write(_HELPER_C)
    proc = subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", library, source], capture_output=True, text=True)
    return library if proc.returncode == 0 else None


def _no_aslr() -> list[str]:
    """``setarch <arch> -R``: run without address-space randomisation (empty where unavailable)."""
    setarch = shutil.which("setarch")
    if setarch is None:
        return []
    probe = subprocess.run([setarch, platform.machine(), "-R", "true"], capture_output=True, check=False)
    return [setarch, platform.machine(), "-R"] if probe.returncode == 0 else []


def _count(names: list[str], short: int, long: int, helper: str, folder: str, tag: str,
           layout: int = 0) -> dict[tuple[str, int], int]:
    out = os.path.join(folder, f"callgrind.{tag}.out")
    # ``layout`` pads the environment: the process then starts with its stack, and so its
    # heap history, shifted; the count of the same code moves by a few thousand per step.
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "ZT_BENCH_LAYOUT": "x" * (97 * layout)}
    cmd = [
        *_no_aslr(), "valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, os.path.abspath(__file__), "--child", ",".join(names), "--short", str(short), "--long", str(long),
        "--helper", helper,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"callgrind run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    counts: dict[tuple[str, int], int] = {}
    for path in sorted(p for p in os.listdir(folder) if p.startswith(f"callgrind.{tag}.out")):
        with open(os.path.join(folder, path), errors="replace") as handle:
            text = handle.read()
        label = re.search(r"^desc: Trigger: Client Request: (.+)\|(\d+)$", text, re.M)
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if label and total:
            counts[label.group(1), int(label.group(2))] = int(total.group(1))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=1, help="epochs of the short run (default 1)")
    parser.add_argument("--long", type=int, default=5, help="epochs of the long run (default 5)")
    parser.add_argument("--only", help="comma-separated contender names (default: all)")
    parser.add_argument("--layouts", type=int, default=1,
                        help="processes per contender, each with its memory laid out differently; the table gives "
                             "their mean and range (default 1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--helper", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.long <= args.short:
        parser.error("--long must be larger than --short")
    if args.layouts < 1:
        parser.error("--layouts must be at least 1")
    names = list(CONTENDERS) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; known: {list(CONTENDERS)}")
    if args.child is not None:
        _child(args.child.split(","), args.short, args.long, args.helper)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed; this benchmark counts instructions with callgrind (apt install valgrind)")
        return 0
    steps = (args.long - args.short) * STEPS_PER_EPOCH
    runs: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as folder:
        helper = _compile_helper(folder)
        if helper is None:
            print("could not compile the callgrind helper (needs a C compiler and valgrind/callgrind.h)")
            return 0
        with ThreadPoolExecutor(max_workers=2) as pool:  # a process per contender and layout, two at a time
            jobs = [(name, pool.submit(_count, [name], args.short, args.long, helper, folder, f"{i}.{layout}", layout))
                    for layout in range(args.layouts) for i, name in enumerate(names)]
            for name, job in jobs:
                counts = job.result()
                if (name, args.long) in counts and (name, args.short) in counts:
                    runs[name].append((counts[name, args.long] - counts[name, args.short]) / steps)
    per_step = {n: sum(r) / len(r) for n, r in runs.items() if r}
    import torch

    print(f"instructions per training step (callgrind; {args.long} - {args.short} epochs of {STEPS_PER_EPOCH} steps; "
          f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}"
          + (f"; mean of {args.layouts} memory layouts" if args.layouts > 1 else "") + ")")
    core = per_step.get("core")
    spread = f" {'range':>19} {'vs twin, by layout':>19}" if args.layouts > 1 else ""
    print(f"{'contender':<32} {'instructions':>13} {'vs raw loop':>12} {'vs its twin':>12} {'+ vs core':>10}{spread}")
    for name, count in per_step.items():
        raw = per_step.get("raw loop")
        twin = per_step.get(TWINS.get(name, ""))
        vs_raw = f"{count / raw:11.3f}x" if raw else f"{'-':>12}"
        vs_twin = f"{count / twin:11.3f}x" if twin else f"{'-':>12}"
        extra = f"{count - core:+10,.0f}" if core is not None and name.startswith("core +") else f"{'':>10}"
        lo_hi = ""
        if args.layouts > 1:
            lo_hi = f" {min(runs[name]):9,.0f}-{max(runs[name]):9,.0f}"
            twin_runs = runs.get(TWINS.get(name, ""), [])
            paired = [a / b for a, b in zip(runs[name], twin_runs)]  # the same layout for both
            lo_hi += f" {min(paired):8.3f}-{max(paired):.3f}x" if paired else f" {'':>19}"
        print(f"{name:<32} {count:13,.0f} {vs_raw} {vs_twin} {extra}{lo_hi}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
