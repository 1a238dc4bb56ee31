"""The overhead benchmark runs and prints its table (speed itself is measured, not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_overhead.py"


@pytest.mark.slow
def test_overhead_benchmark_prints_a_ratio_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "20", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = {line.split()[0] for line in lines[2:]}
    assert {"raw", "zae_trainer"} <= rows
    zae_row = next(line for line in lines if line.startswith("zae_trainer "))
    assert zae_row.split()[-1].endswith("x") and float(zae_row.split()[-1][:-1]) > 0
    assert any(line.startswith("zae_trainer + 2 add-ons") for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # Lightning wrote no logs here


@pytest.mark.slow
def test_instruction_benchmark_child_runs_each_contender_and_checks_its_arguments(tmp_path: Path) -> None:
    script = SCRIPT.parent / "bench_instructions.py"
    # What callgrind runs, here without valgrind (its client requests are then no-ops): every
    # contender trains a warm-up, a short and a long run. Valgrind itself is too slow for the suite.
    sys.path.insert(0, str(script.parent))
    import bench_instructions

    proc = subprocess.run([sys.executable, str(script), "--child", ",".join(bench_instructions.CONTENDERS),
                           "--short", "1", "--long", "2"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # checkpoints and logs went to a temporary folder
    proc = subprocess.run([sys.executable, str(script), "--short", "10", "--long", "5"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "--long must be larger than --short" in proc.stderr
    proc = subprocess.run([sys.executable, str(script), "--layouts", "0"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "--layouts must be at least 1" in proc.stderr
