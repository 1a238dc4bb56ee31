"""ThroughputMonitorAddon: samples/s, batches/s, step time (and FLOP/s) at every log point.

Measured by interval timing, never per step: an interval starts at the first training batch
after a log point (or after an epoch began) and ends at the next log point, where the
counters of ``trainer.progress_checker`` (samples, batches, optimizer steps) are compared
with the interval's start. On CUDA the device is synchronised once at the log point, so the
interval holds the GPU's work too; nothing is synchronised between log points.

What an interval leaves out: validation, epoch-end hooks (checkpoints) and the log point
itself (its add-on order, -150, puts it ahead of the state manager's step checkpoints and of
loggers on ``LOG``), because the next interval only starts when the next training batch does.

The values are added to the ``LOG`` metrics dict, which every later ``on_log`` sees, so
loggers record them as ``throughput/samples_per_sec``, ``throughput/batches_per_sec``,
``throughput/step_time`` (seconds per optimizer step) and, with ``flops_per_sample``,
``throughput/flops_per_sec``. Under DDP they are this process's numbers (``LOG`` fires on the
main process); the job's throughput is about ``world_size`` times as large.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..addon import AddOn

__all__ = ["ThroughputMonitorAddon"]


class ThroughputMonitorAddon(AddOn):
    """Training throughput over each logging interval, added to what loggers receive.

    Parameters
    ----------
    flops_per_sample : float or None
        FLOPs one training sample costs (forward + backward); adds ``throughput/flops_per_sec``.
    synchronize : bool
        On CUDA, wait for the device at each log point so the interval includes queued GPU
        work (one synchronisation per log point, never per step).

    Attributes
    ----------
    last : dict of str to float
        The values of the latest log point (empty before the first).

    Examples
    --------
    >>> MyTrainer.add_on(ThroughputMonitorAddon(flops_per_sample=6 * n_params))  # doctest: +SKIP
    >>> trainer.get_addon("throughput").last["throughput/samples_per_sec"]  # doctest: +SKIP
    """

    name = "throughput"
    order = -150  # on LOG: before the state manager's step checkpoints and before loggers

    def __init__(self, *, flops_per_sample: float | None = None, synchronize: bool = True) -> None:
        if flops_per_sample is not None and not (isinstance(flops_per_sample, (int, float)) and flops_per_sample > 0):
            raise ValueError(f"flops_per_sample must be a number > 0 or None, got {flops_per_sample!r}")
        self.flops_per_sample = None if flops_per_sample is None else float(flops_per_sample)
        self.synchronize = bool(synchronize)
        self.last: dict[str, float] = {}
        self._start: tuple[float, int, int, int] | None = None  # (time, samples, batches, steps)

    def on_epoch_begin(self, trainer: Any) -> None:
        self._start = None

    def on_train_batch_begin(self, trainer: Any) -> None:
        if self._start is None:
            pc = trainer.progress_checker
            self._start = (time.perf_counter(), pc.samples, pc.batches, pc.step)

    def on_log(self, trainer: Any, metrics: dict[str, float]) -> None:
        if self._start is None:
            return
        if self.synchronize and trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        started, samples, batches, steps = self._start
        self._start = None
        seconds = time.perf_counter() - started
        pc = trainer.progress_checker
        if seconds <= 0 or pc.batches == batches:
            return
        values = {
            "throughput/samples_per_sec": (pc.samples - samples) / seconds,
            "throughput/batches_per_sec": (pc.batches - batches) / seconds,
        }
        if pc.step > steps:
            values["throughput/step_time"] = seconds / (pc.step - steps)
        if self.flops_per_sample is not None:
            values["throughput/flops_per_sec"] = values["throughput/samples_per_sec"] * self.flops_per_sample
        metrics.update(values)
        self.last = values
