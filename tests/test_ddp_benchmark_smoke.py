"""The DDP overhead benchmark runs and prints its table (speed is measured, not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_ddp.py"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_benchmark_prints_its_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "5", "--rounds", "1", "--hidden", "16", "--device", "cpu"],
        capture_output=True, text=True, timeout=110, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "CPU with gloo" in lines[0]  # labelled: not the GPU measurement
    rows = {line.split()[0] for line in lines[2:6]}
    assert rows == {"raw", "raw_DDP", "zae_trainer", "zae_trainer+DDP"}
    assert lines[-1].startswith("add-on + trainer overhead vs raw DDP")
    assert list(tmp_path.iterdir()) == []
