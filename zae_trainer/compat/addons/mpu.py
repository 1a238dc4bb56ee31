"""zae-engine's ``MultiGPUAddon``: data-parallel training over the devices given as ``device=[...]``.

It is the core :class:`zae_trainer.addons.MultiGPUAddon` (DistributedDataParallel, one process
per device, a ``DistributedSampler`` per loader, epoch metrics all-reduced), configured as in
zae-engine: ``Trainer.add_on(MultiGPUAddon)(model, device=[cuda:0, cuda:1], ...,
init_method="tcp://localhost:12355")``. Fixed from zae-engine: the backend follows the devices
(NCCL on CUDA, gloo on CPU) instead of always NCCL, the port is free-picked unless
``init_method`` names one, and the samplers' epoch is set so each epoch shuffles differently.

Tested with the core trainer (``tests/test_ddp_*.py``); no test here runs it under the compat
``Trainer`` yet, and zae-engine's own ``test_mpu.py`` needs two GPUs.
"""

from __future__ import annotations

from ...addons.multi_gpu import MultiGPUAddon

__all__ = ["MultiGPUAddon"]
