"""zae-engine's ``MultiGPUAddon``: data-parallel training over the devices given as ``device=[...]``.

It is the core :class:`zae_trainer.addons.MultiGPUAddon` (DistributedDataParallel, one process
per device, a ``DistributedSampler`` per loader, epoch metrics all-reduced), configured as in
zae-engine: ``Trainer.add_on(MultiGPUAddon)(model, device=[cuda:0, cuda:1], ...,
init_method="tcp://localhost:12355")``. Fixed from zae-engine: the backend follows the devices
(NCCL on CUDA, gloo on CPU) instead of always NCCL, the port is free-picked unless
``init_method`` names one, and the samplers' epoch is set so each epoch shuffles differently.

Tested with the core trainer (``tests/test_ddp_*.py``) and under the compat ``Trainer`` as
zae-engine's own ``test_mpu.py`` uses it, on two CPU processes over gloo
(``tests/test_compat_mpu.py``: the same weights as one process with twice the batch, per-batch
``logging()`` and ``metric_on_epoch_end()`` in each worker, the state manager's folder written
once); zae-engine's ``test_mpu.py`` itself needs two GPUs. Unlike zae-engine, whose trainer
stayed untrained in the calling process after ``mp.spawn``, the caller's trainer holds rank 0's
final state (weights, optimizer, scheduler, progress, history) when ``run`` returns.
"""

from __future__ import annotations

from ...addons.multi_gpu import MultiGPUAddon

__all__ = ["MultiGPUAddon"]
