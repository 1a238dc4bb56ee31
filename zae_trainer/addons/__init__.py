"""Built-in add-ons, one module each. Import them from here::

    from zae_trainer.addons import StateManagerAddon, GradientClippingAddon

Modules load lazily, so importing one add-on never imports another's dependencies
(wandb, neptune, accelerate).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ..registry import BUILTIN_ADDONS

#: class name -> module, derived from the registry so the two never disagree
_CLASS_MODULES = {target.split(":")[1]: target.split(":")[0] for target in BUILTIN_ADDONS.values()}

__all__ = [*sorted(_CLASS_MODULES), "available"]


def __getattr__(name: str) -> Any:
    module = _CLASS_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'zae_trainer.addons' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def available() -> dict[str, dict[str, Any]]:
    """Every named add-on, built-in and installed, with its settings and defaults.

    Returns ``{name: {"class", "distribution", "target", "settings", "importable", "error"}}``.
    An add-on whose module cannot be imported (a missing optional dependency) is listed with
    ``importable=False`` and the reason, rather than hidden.

    Examples
    --------
    >>> "state_manager" in available()
    True
    """
    from ..registry import entries

    listing: dict[str, dict[str, Any]] = {}
    for key, entry in sorted(entries().items()):
        info: dict[str, Any] = {
            "class": entry.target.split(":")[1],
            "distribution": entry.distribution,
            "target": entry.target,
            "settings": {},
            "importable": True,
            "error": None,
        }
        try:
            cls = entry.load()
            settings = getattr(cls, "settings", None)
            if callable(settings):
                info["settings"] = {k: ("<required>" if v is inspect.Parameter.empty else v) for k, v in settings().items()}
        except Exception as exc:  # listing must not fail because one plugin is broken
            info["importable"] = False
            info["error"] = f"{type(exc).__name__}: {exc}"
        listing[key] = info
    return listing


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
