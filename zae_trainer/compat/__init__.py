"""zae-engine's trainer API over the zae_trainer core: migrate by swapping the import prefix.

``zae_engine.trainer`` becomes ``zae_trainer.compat``::

    from zae_trainer.compat import Trainer, ProgressChecker
    from zae_trainer.compat.addons import StateManagerAddon, WandBLoggerAddon

The layer is a subclass of the core :class:`zae_trainer.Trainer` built on its documented
extension points (:mod:`zae_trainer.contract`); users of the core pay nothing for it. See
``docs/guides/migrating-from-zae-engine.md`` for what differs from zae-engine and why.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Trainer", "T", "ProgressChecker"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: importing zae_trainer must not import the zae-engine layer.
    if name in __all__:
        from . import _trainer

        return getattr(_trainer, name)
    raise AttributeError(f"module 'zae_trainer.compat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
