"""MultiGPUAddon under a launcher: ``python -m torch.distributed.run`` starts the processes,
the add-on finds its rank in the environment; the trainer code is the same as in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_helpers import ddp_trainer, loader, params

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "ddp_scripts" / "launched_run.py"


def run_under_torchrun(out_dir: Path, *script_args: str, timeout: float = 150) -> list[dict]:
    """Two CPU processes under torch's launcher; returns each rank's report, rank order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(out_dir), *script_args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.timeout(180)
def test_torchrun_launch_trains_like_one_process_with_double_batch(tmp_path) -> None:
    reports = run_under_torchrun(tmp_path / "out")

    reference = ddp_trainer()
    reference.run(2, loader(48, batch_size=8), loader(20, batch_size=8, seed=7))
    expected = [p.flatten().tolist() for p in params(reference)]

    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world_size"] == 2
        assert report["is_main"] is (rank == 0)
        assert report["group_after_run"] is False  # the add-on destroyed the group it created
        assert report["model_type"] == "Linear"  # unwrapped again after run()
        for got, want in zip(report["params"], expected):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
        assert report["metrics"]["valid/loss"] == pytest.approx(reference.epoch_metrics["valid/loss"], rel=1e-5)
    assert reports[0]["metrics"] == reports[1]["metrics"]
