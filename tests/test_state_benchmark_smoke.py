"""The checkpoint benchmark runs end to end on a small state and prints its tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_checkpoint.py"


@pytest.mark.slow
def test_checkpoint_benchmark_prints_ratio_tables(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--params-m", "4", "--repeats", "1", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for row in ("dd (fdatasync)", "torch.save + fsync", "zae ckpt save", "zae safetensors save",
                "zae ckpt load", "async save (ckpt)"):
        assert row in out, row
    async_row = next(line for line in out.splitlines() if line.startswith("async save"))
    assert async_row.split()[-1].endswith("x")
    assert list(tmp_path.iterdir()) == []  # the benchmark cleaned up after itself
