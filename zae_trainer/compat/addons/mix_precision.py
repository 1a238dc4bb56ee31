"""zae-engine's ``PrecisionMixerAddon``: the core's mixed precision, with zae-engine's attributes.

``precision="auto" | "fp32" | "fp16" | "bf16" | [priority list]`` as in zae-engine;
``trainer.precision`` is zae-engine's list (``"auto"``: ``["bf16", "fp16"]`` on compute
capability 8.0+, ``["fp16"]`` on older GPUs, ``["fp32"]`` without CUDA) and ``trainer.scaler``
the ``GradScaler`` (fp16 only). What runs is the core :class:`zae_trainer.addons.PrecisionMixerAddon`.

Fixed from zae-engine: a CPU is allowed (zae-engine raised ``ValueError``; here ``"auto"``
means fp32 on a CPU, and bf16/fp16 can be asked for explicitly); bf16 autocasts to bfloat16
(zae-engine always used float16); gradient clipping is kept (zae-engine re-implemented
``run_batch`` and dropped it); gradients are unscaled before clipping.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...addons.precision import PrecisionMixerAddon as _CorePrecisionMixer

__all__ = ["PrecisionMixerAddon"]


class PrecisionMixerAddon(_CorePrecisionMixer):
    """Mixed precision configured by ``precision=``; see the module docstring."""

    #: trainer attribute -> this add-on's attribute (zae-engine set them on the trainer)
    trainer_attributes = {"precision": "zae_precision", "scaler": "scaler"}

    def __init__(
        self,
        *,
        precision: str | Sequence[str] = "auto",
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
    ) -> None:
        super().__init__(precision=precision, init_scale=init_scale, growth_interval=growth_interval)
        self.zae_precision = _zae_engine_list(precision)


def _zae_engine_list(precision: str | Sequence[str]) -> list[str]:
    """zae-engine's ``_determine_precision``: the list it stored as ``trainer.precision``."""
    if precision == "auto":
        if torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 8:
            return ["bf16", "fp16"]
        if torch.cuda.is_available():
            return ["fp16"]
        return ["fp32"]
    if isinstance(precision, str):
        return [precision]
    return list(precision)
