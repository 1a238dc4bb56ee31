"""The FSDP benchmark runs, prints its table, and shows the sharding (memory is counted, not timed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fsdp.py"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fsdp_benchmark_prints_its_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--width", "32", "--depth", "2", "--steps", "2", "--repeat", "1"],
        capture_output=True, text=True, timeout=230, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "CPU with gloo" in lines[0]  # labelled: not a GPU measurement
    assert [line.split()[0] for line in lines[2:4]] == ["DDP", "FSDP"]
    ratio = float(re.search(r"per-rank total: ([0-9.]+)", proc.stdout).group(1))  # type: ignore[union-attr]
    assert 0.45 < ratio < 0.6  # each rank holds about half (shards are padded to equal sizes)
    formats = [line.split(",")[0] for line in lines[-4:]]
    assert formats == ["ckpt", "safetensors", "dcp", "dcp"]
    assert list(tmp_path.iterdir()) == []  # checkpoints went to a temporary folder
