"""Per-step overhead of the trainer counted in CPU instructions (valgrind's callgrind).

Wall-clock timings on a shared VM vary by tens of percent from round to round, more than the
trainer's own per-step cost on a tiny model. Instruction counts do not depend on what else
the machine is doing, so this script gives a second, repeatable measure of the same thing as
``bench_overhead.py``: each contender (same workload as there) runs under callgrind for
``--short`` and for ``--long`` steps, and the difference divided by the extra steps is its
cost per step, with start-up (imports, data, model) cancelled out. ``PYTHONHASHSEED=0`` keeps
Python's own work identical between the two runs.

Instructions are not time; read this beside ``bench_overhead.py``, not instead of it. Each run
starts Python and torch under valgrind, about 3 minutes apiece on a 2-core VM; runs go two at a
time.

Run:  python benchmarks/bench_instructions.py [--short 100] [--long 1100]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
CONTENDERS = {
    "raw loop": "bare",
    "raw loop + loss sum": "loss",
    "zae_trainer": "zae",
}


def _child(kind: str, steps: int) -> None:
    """Run one contender for ``steps`` steps (called under valgrind)."""
    import torch

    sys.path.insert(0, HERE)
    import bench_overhead as bench

    torch.set_num_threads(1)
    data = bench.make_data(steps)
    if kind == "zae":
        bench.bench_zae(data)
    else:
        bench.bench_raw(data, track_loss=kind == "loss")


def _count(kind: str, steps: int, folder: str) -> int:
    out = os.path.join(folder, f"callgrind.{kind}.{steps}")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__, "--child", kind, str(steps)],
        capture_output=True, text=True, env=env, check=False,
    )
    match = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"callgrind run of {kind} ({steps} steps) failed:\n{proc.stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=100)
    parser.add_argument("--long", type=int, default=1100)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return 0
    if args.long <= args.short:
        parser.error("--long must be larger than --short")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed; this benchmark counts instructions with callgrind (apt install valgrind)")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as folder, ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {
            (name, steps): pool.submit(_count, kind, steps, folder)
            for name, kind in CONTENDERS.items()
            for steps in (args.short, args.long)
        }
        per_step = {
            name: (jobs[name, args.long].result() - jobs[name, args.short].result()) / (args.long - args.short)
            for name in CONTENDERS
        }
    print(f"instructions per step (callgrind, {args.long} - {args.short} steps, PYTHONHASHSEED=0)")
    print(f"{'contender':<22} {'instructions':>13} {'vs raw':>8} {'vs raw+loss':>12}")
    for name, count in per_step.items():
        print(
            f"{name:<22} {count:13,.0f} {count / per_step['raw loop']:7.3f}x "
            f"{count / per_step['raw loop + loss sum']:11.3f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
