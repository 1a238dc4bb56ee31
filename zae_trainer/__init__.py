"""zae_trainer: a small PyTorch training loop that emits events, and add-ons composed onto it.

>>> from zae_trainer import Trainer, AddOn, Event
"""

from __future__ import annotations

from .addon import AddOn, AddOnBase
from .config import from_config
from .contract import TrainerView
from .errors import (
    AddOnDefinitionError,
    AddOnHookError,
    NonFiniteLossError,
    SkipStep,
    StepOutputError,
    TrainerConfigError,
    TrainingTerminated,
)
from .events import Event
from .progress import ProgressChecker
from .seed import seed_everything
from .supervised import SupervisedTrainer
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "Trainer",
    "SupervisedTrainer",
    "from_config",
    "TrainerView",
    "ProgressChecker",
    "seed_everything",
    "Event",
    "AddOn",
    "AddOnBase",
    "SkipStep",
    "AddOnDefinitionError",
    "AddOnHookError",
    "NonFiniteLossError",
    "StepOutputError",
    "TrainerConfigError",
    "TrainingTerminated",
    "__version__",
]
