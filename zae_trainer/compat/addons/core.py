"""zae-engine's ``AddOnBase``: a class whose ``apply(base_cls)`` returns a trainer subclass.

It is the core's :class:`zae_trainer.addon.AddOnBase`, so ``Trainer.add_on`` accepts add-ons
written for zae-engine unchanged (overriding ``logging``, ``check_better``, ``__init__`` with
their own keywords, ...). ``T`` is the trainer type variable zae-engine exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from ...addon import AddOnBase

if TYPE_CHECKING:  # pragma: no cover
    from .._trainer import Trainer

__all__ = ["AddOnBase", "T"]

T = TypeVar("T", bound="Trainer")
