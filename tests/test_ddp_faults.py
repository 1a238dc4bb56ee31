"""MultiGPUAddon faults: a failing or hanging rank ends every rank, in bounded time, and the
launcher's error names the rank and its original error. No worker process is left behind."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil
import pytest

from ddp_helpers import FailAt, ddp_trainer, fast_start_method, loader
from zae_trainer.addons.distributed import DistributedWorkerError, current_rank
from zae_trainer.addons.multi_gpu import MultiGPUAddon
from zae_trainer.testing.tiny import TinyRegressionTrainer, tiny_trainer

pytestmark = pytest.mark.slow


def _workers() -> list[psutil.Process]:
    """Descendants of this process, except multiprocessing's long-lived helpers (the
    forkserver and the resource tracker), whose children the workers would be."""
    me = os.getpid()
    found = []
    for proc in psutil.Process(me).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            helper = proc.ppid() == me and ("forkserver" in cmdline or "resource_tracker" in cmdline)
            # wandb's service process outlives its runs by design (an earlier logger test started it)
            helper = helper or proc.name() == "wandb-core"
        except psutil.NoSuchProcess:
            continue
        if not helper and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


class FailsInTrainStep(TinyRegressionTrainer):
    """User code that fails on rank 0 at its third training batch."""

    def train_step(self, batch: Any) -> dict[str, Any]:
        if current_rank() == 0 and self.progress_checker.batches == 2:
            raise ZeroDivisionError("user code failed on rank 0")
        return super().train_step(batch)


@pytest.mark.timeout(120)
def test_a_rank_that_raises_ends_all_ranks_and_is_named() -> None:
    trainer = ddp_trainer(MultiGPUAddon, FailAt(fail_rank=1, fail_batch=3), world_size=2)
    started = time.monotonic()
    with pytest.raises(DistributedWorkerError) as info:
        trainer.run(2, loader(48, batch_size=4))
    elapsed = time.monotonic() - started
    error = info.value
    assert error.rank == 1 and error.world_size == 2
    assert "rank 1 of 2 failed" in str(error) and "boom on rank 1 at batch 3" in str(error)
    assert "Traceback" in error.remote_traceback
    assert elapsed < 60
    assert _workers() == []


@pytest.mark.timeout(120)
def test_an_error_in_user_code_is_re_raised_with_its_original_as_cause() -> None:
    trainer = tiny_trainer(FailsInTrainStep.add_on(MultiGPUAddon), world_size=2, collective_timeout=60.0,
                           start_method=fast_start_method())
    with pytest.raises(DistributedWorkerError) as info:
        trainer.run(1, loader(48, batch_size=4))
    assert info.value.rank == 0 and info.value.original_type == "ZeroDivisionError"
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert str(info.value.__cause__) == "user code failed on rank 0"
    assert _workers() == []


@pytest.mark.timeout(120)
def test_a_hanging_rank_is_bounded_by_the_collective_timeout() -> None:
    # Rank 1 stalls for 60 s; rank 0's gradient all-reduce gives up after 3 s, which ends the run.
    trainer = ddp_trainer(
        MultiGPUAddon, FailAt(fail_rank=1, fail_batch=2, hang_seconds=60), world_size=2, collective_timeout=3.0
    )
    started = time.monotonic()
    with pytest.raises(DistributedWorkerError) as info:
        trainer.run(1, loader(48, batch_size=4))
    elapsed = time.monotonic() - started
    assert info.value.rank == 0
    assert elapsed < 40
    assert _workers() == []
