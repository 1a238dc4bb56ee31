"""zae-engine's trainer API over the zae_trainer core: migrate by swapping the import prefix.

``zae_engine.trainer`` becomes ``zae_trainer.compat``::

    from zae_trainer.compat import Trainer
    from zae_trainer.compat.addons import StateManagerAddon

See ``docs/guides/migrating-from-zae-engine.md`` for what differs and why.
"""

from __future__ import annotations

from typing import Any

from ._mixin import ZaeEngineCompat

__all__ = ["ZaeEngineCompat"]


def __getattr__(name: str) -> Any:
    # Trainer is imported lazily: the core imports this package, so importing the core
    # trainer here at module level would be a cycle.
    if name in ("Trainer", "T", "ProgressChecker"):
        from . import _trainer

        return getattr(_trainer, name)
    raise AttributeError(f"module 'zae_trainer.compat' has no attribute {name!r}")
