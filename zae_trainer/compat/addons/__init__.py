"""zae-engine's add-ons (``zae_engine.trainer.addons``) over the zae_trainer core.

Each is a zae_trainer :class:`~zae_trainer.AddOn` configured the zae-engine way, by keywords
to the trainer's constructor (``save_path=``, ``web_logger=``, ``precision=``). Settings are
routed by declaration, so ``web_logger=`` reaches both web loggers.
"""

from __future__ import annotations

from .core import AddOnBase
from .mix_precision import PrecisionMixerAddon
from .mpu import MultiGPUAddon
from .state_manager import StateManagerAddon
from .web_logger import NeptuneLoggerAddon, WandBLoggerAddon

__all__ = [
    "AddOnBase",
    "MultiGPUAddon",
    "NeptuneLoggerAddon",
    "WandBLoggerAddon",
    "StateManagerAddon",
    "PrecisionMixerAddon",
]
