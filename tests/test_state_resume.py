"""Exact resume: a run stopped anywhere and resumed ends bit-identical to one that never stopped.

The subprocess tests kill a real training process with SIGKILL at random steps (mid-epoch
included) and resume it in a fresh process, several times in a row.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from state_scripts.resumable_run import (
    BATCHES_PER_EPOCH,
    EPOCHS,
    make_loader,
    make_trainer,
    make_valid_loader,
    outcome,
)

SCRIPT = os.path.join(os.path.dirname(__file__), "state_scripts", "resumable_run.py")
TOTAL_STEPS = EPOCHS * BATCHES_PER_EPOCH


def assert_identical(expected: dict, actual: dict) -> None:
    for part in ("params", "optimizer"):
        assert expected[part].keys() == actual[part].keys()
        for name in expected[part]:
            assert torch.equal(expected[part][name], actual[part][name]), f"{part} {name} differs"
    assert torch.equal(expected["losses"], actual["losses"]), "per-step losses differ"
    assert len(actual["losses"]) == TOTAL_STEPS
    assert torch.equal(expected["lr"], actual["lr"]) and torch.equal(expected["step"], actual["step"])


def checkpoint_names(folder) -> list[str]:
    with open(os.path.join(folder, "manifest.json")) as fh:
        return [e["name"] for e in json.load(fh)["checkpoints"]]


@pytest.mark.parametrize(
    "fmt, stateful", [("ckpt", False), ("safetensors", False), ("ckpt", True)], ids=["ckpt", "safetensors", "stateful"]
)
def test_resume_from_any_step_in_process_is_exact(tmp_path, fmt, stateful):
    reference = make_trainer(str(tmp_path), save_format=fmt, keep_last=100)
    reference.run(EPOCHS, make_loader(stateful=stateful), make_valid_loader())
    expected = outcome(reference)
    names = checkpoint_names(tmp_path)
    # mid-epoch (batch 4 of epoch 1 and 2), the end of an epoch's batches, and an epoch boundary
    picks = [n for n in names if n.endswith(("step0000004-batch00004" + (".ckpt" if fmt == "ckpt" else ""),))]
    picks += [names[13], names[8], names[9]]
    for name in picks:
        resumed = make_trainer(str(tmp_path), save_format=fmt, keep_last=100, resume=os.path.join(tmp_path, name))
        torch.manual_seed(999)  # disturb the global RNG: the checkpoint's state must win
        resumed.run(EPOCHS, make_loader(stateful=stateful), make_valid_loader())
        assert_identical(expected, outcome(resumed))


def run_script(save_path, out, workers, fmt, kill_after=None):
    """Run the training script; SIGKILL it once it reports a step >= kill_after. Returns the step killed at."""
    cmd = [sys.executable, SCRIPT, "--save-path", str(save_path), "--out", str(out), "--workers", str(workers),
           "--format", fmt, "--step-sleep", "0.01"]
    # Its own process group, so the kill takes the DataLoader workers too, as a preemption would.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    last = None
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                last = int(line.split()[1])
                if kill_after is not None and last >= kill_after:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    if kill_after is None:
        assert proc.returncode == 0, stderr
    else:
        assert proc.returncode == -signal.SIGKILL, f"expected a SIGKILL death, got {proc.returncode}: {stderr}"
    return last


@pytest.mark.slow
@pytest.mark.parametrize("workers, fmt", [(0, "ckpt"), (2, "safetensors")])
def test_sigkilled_run_resumes_bit_identical(tmp_path, workers, fmt):
    run_script(tmp_path / "reference", tmp_path / "reference.pt", workers, fmt)
    expected = torch.load(tmp_path / "reference.pt", weights_only=True)
    rng = random.Random(f"kill-points-{workers}")
    kill_points = sorted(rng.sample(range(2, TOTAL_STEPS - 3), 3))
    assert any(k % BATCHES_PER_EPOCH for k in kill_points)  # at least one mid-epoch kill
    folder = tmp_path / "interrupted"
    reached = []
    for point in kill_points:
        reached.append(run_script(folder, tmp_path / "unused.pt", workers, fmt, kill_after=point))
    run_script(folder, tmp_path / "resumed.pt", workers, fmt)
    assert_identical(expected, torch.load(tmp_path / "resumed.pt", weights_only=True))
    assert reached == sorted(reached)  # each process went further: it resumed, not restarted
