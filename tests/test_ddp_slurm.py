"""SLURM (issue 13.7): ``srun``'s tasks join as ranks with a distributing add-on, and a
one-process trainer in one of several tasks is refused with the command to use."""

from __future__ import annotations

import os

import pytest
import torch

from ddp_helpers import ddp_trainer, loader, params, rank_report, start_ranks
from zae_trainer import TrainerConfigError
from zae_trainer.slurm import first_host, slurm_tasks


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("localhost", "localhost"),
        ("gpu[07-09,12],cpu1", "gpu07"),
        ("node3,node[1-2]", "node3"),
        ("rack[1-2]-n[001-004]", "rack1-n001"),
        ("a[5,3]", "a5"),
    ],
)
def test_first_host_of_a_node_list(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_first_host_refuses_what_it_cannot_read() -> None:
    with pytest.raises(TrainerConfigError, match="MASTER_ADDR"):
        first_host("gpu[01-02")


def test_slurm_tasks_are_read_from_srun_variables() -> None:
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "123456"}
    tasks = slurm_tasks(env)
    assert tasks is not None
    assert (tasks.rank, tasks.world_size, tasks.local_rank) == (3, 4, 1)
    assert (tasks.master_addr, tasks.master_port) == ("gpu07", 10000 + 123456 % 20000)
    # The step's own task count wins over the allocation's; MASTER_* given are kept.
    assert slurm_tasks({**env, "SLURM_STEP_NUM_TASKS": "2", "MASTER_PORT": "29500"}).world_size == 2  # type: ignore[union-attr]
    assert slurm_tasks({**env, "MASTER_PORT": "29500", "MASTER_ADDR": "h"}).master_port == 29500  # type: ignore[union-attr]
    # Not srun tasks: one task, an interactive allocation, torchrun started by srun.
    assert slurm_tasks({**env, "SLURM_NTASKS": "1"}) is None
    assert slurm_tasks({**env, "SLURM_JOB_NAME": "bash"}) is None
    assert slurm_tasks({**env, "RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0"}) is None


def test_a_one_process_trainer_in_several_srun_tasks_is_refused(monkeypatch, tmp_path) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost")
    trainer = ddp_trainer()
    with pytest.raises(TrainerConfigError) as info:
        trainer.run(1, loader(8, batch_size=4))
    message = str(info.value)
    assert "SLURM task 0 of 2" in message and "MultiGPUAddon" in message and "srun --ntasks-per-node=1 torchrun" in message
    assert trainer.progress_checker.step == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_srun_tasks_train_together_like_one_process_with_double_batch(tmp_path) -> None:
    out = str(tmp_path)
    procs = start_ranks("plain", out, slurm=True)
    for p in procs:
        output, _ = p.communicate(timeout=200)
        assert p.returncode == 0, output[-3000:]
    reference = ddp_trainer()
    reference.run(2, loader(48, batch_size=8), loader(20, batch_size=8, seed=7))
    expected = params(reference)
    reports = [rank_report(out, r) for r in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world_size"] == 2
        for got, want in zip(report["params"], expected):
            torch.testing.assert_close(torch.tensor(got), want.flatten(), rtol=1e-5, atol=1e-6)
    assert reports[0]["metrics"] == reports[1]["metrics"]
    assert reports[0]["metrics"]["valid/loss"] == pytest.approx(reference.epoch_metrics["valid/loss"], rel=1e-5)
    assert not os.path.exists(os.path.join(out, "rank2.json"))
