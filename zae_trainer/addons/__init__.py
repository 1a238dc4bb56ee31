"""Built-in add-ons, one module each. Import them from here::

    from zae_trainer.addons import StateManagerAddon, GradientClippingAddon

Modules load lazily, so importing one add-on never imports another's dependencies
(wandb, neptune, accelerate).
"""

from __future__ import annotations

import importlib
from typing import Any

from ..registry import BUILTIN_ADDONS

#: class name -> module, derived from the registry so the two never disagree
_CLASS_MODULES = {target.split(":")[1]: target.split(":")[0] for target in BUILTIN_ADDONS.values()}

__all__ = sorted(_CLASS_MODULES)


def __getattr__(name: str) -> Any:
    module = _CLASS_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'zae_trainer.addons' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
