"""Ranks stop together and start together (issue 12.9), with real gloo processes.

A SIGTERM that reaches one rank only must end every rank within a bounded time, far below
the collective timeout, each through the interrupt path (INTERRUPT, emergency checkpoint,
status "interrupted"), at the same step. Ranks that resume from different checkpoints are
refused before they train.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest

from ddp_helpers import ddp_trainer, loader, rank_report, start_ranks
from zae_trainer.addons.state_manager import StateManagerAddon

pytestmark = pytest.mark.slow


def _wait_for(paths: list[str], procs: list[Any], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not all(os.path.exists(p) for p in paths):
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise AssertionError("a rank ended early:\n" + dead[0].stdout.read()[-3000:])
        if time.monotonic() > deadline:
            raise AssertionError(f"ranks did not get under way in {seconds} s")
        time.sleep(0.05)


def _finish(procs: list[Any], seconds: float) -> list[tuple[int, str]]:
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"a rank still ran {seconds} s after the signal") from None
        results.append((p.returncode, out))
    return results


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["stop", "stop-accelerate"])
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, mode: str) -> None:
    if mode == "stop-accelerate":
        pytest.importorskip("accelerate")
    out = str(tmp_path)
    procs = start_ranks(mode, out, env_of_rank={r: {"COLLECTIVE_TIMEOUT": "300"} for r in (0, 1)})
    try:
        _wait_for([os.path.join(out, f"ready-rank{r}") for r in (0, 1)], procs, 150)
        signalled = time.monotonic()
        procs[1].send_signal(signal.SIGTERM)  # rank 1 only
        results = _finish(procs, 60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    stopped_in = time.monotonic() - signalled

    reports = [rank_report(out, r) for r in (0, 1)]
    for (code, output), report in zip(results, reports):
        assert code == 143, output[-3000:]  # TrainingTerminated: 128 + SIGTERM, on both ranks
        assert report["exception"] == "TrainingTerminated" and report["status"] == "interrupted"
    # Both took the interrupt path at the same boundary, long before the 300 s collective timeout.
    assert reports[0]["interrupted_at"] == reports[1]["interrupted_at"] == reports[0]["step"] == reports[1]["step"]
    assert stopped_in < 60
    assert reports[0]["step"] < 4000  # stopped mid-run, not at the end of the epoch
    # Rank 0 wrote the emergency checkpoint at that step.
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert [e["step"] for e in manifest["checkpoints"]] == [reports[0]["step"]]


@pytest.mark.timeout(240)
def test_ranks_resuming_from_different_steps_are_refused(tmp_path) -> None:
    single = ddp_trainer(StateManagerAddon, save_path=str(tmp_path / "ckpt"), save_every_n_steps=2, keep_last=10)
    single.run(1, loader(48, batch_size=8))  # 6 steps: checkpoints at steps 2, 4, 6
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    by_step = {e["step"]: str(tmp_path / "ckpt" / e["name"]) for e in manifest["checkpoints"]}

    out = str(tmp_path / "out")
    os.makedirs(out)
    procs = start_ranks("resume", out, env_of_rank={0: {"RESUME_0": by_step[4]}, 1: {"RESUME_1": by_step[2]}})
    results = _finish(procs, 180)

    for rank, (code, output) in enumerate(results):
        assert code != 0, output[-3000:]
        report = rank_report(out, rank)
        assert report["exception"] == "TrainerConfigError"
        assert "rank 0: (0, 4, 4), rank 1: (0, 2, 2)" in report["message"]
        assert "same checkpoint" in report["message"]
        assert report["step"] == (4 if rank == 0 else 2)  # refused before any batch ran

    # The same checkpoint on both ranks is accepted and trains on.
    out = str(tmp_path / "same")
    os.makedirs(out)
    procs = start_ranks("resume", out, env_of_rank={0: {"RESUME_0": by_step[4]}, 1: {"RESUME_1": by_step[4]}})
    for code, output in _finish(procs, 180):
        assert code == 0, output[-3000:]
    # 6 batches per rank per epoch: the 2 left of epoch 1, then 2 more epochs.
    assert rank_report(out, 0)["step"] == rank_report(out, 1)["step"] == 4 + 2 + 2 * 6
