"""Add-ons by name: the built-ins and those installed under the ``zae_trainer.addons`` entry-point group.

``Trainer.add_on("ema")`` resolves a name here. Names are case-insensitive and may be given
as the add-on's ``name`` or as a short alias (``"state_manager"``). Third-party
distributions register with, in their ``pyproject.toml``::

    [project.entry-points."zae_trainer.addons"]
    ema = "zae_trainer_ema:EMAAddon"
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

from .addon import AddOn, AddOnBase

__all__ = ["ENTRY_POINT_GROUP", "AddOnEntry", "resolve", "entries", "aliases_of", "normalise", "BUILTIN_ADDONS"]

ENTRY_POINT_GROUP = "zae_trainer.addons"

#: alias -> "module:attribute" of the built-in add-ons. Imported only when named, so that
#: naming one add-on never imports wandb or neptune.
BUILTIN_ADDONS: dict[str, str] = {
    "state_manager": "zae_trainer.addons.state_manager:StateManagerAddon",
    "gradient_clipping": "zae_trainer.addons.clipping:GradientClippingAddon",
    "early_stopping": "zae_trainer.addons.early_stopping:EarlyStoppingAddon",
    "precision_mixer": "zae_trainer.addons.precision:PrecisionMixerAddon",
    "nonfinite_guard": "zae_trainer.addons.nonfinite:NonFiniteGuardAddon",
    "throughput": "zae_trainer.addons.throughput:ThroughputMonitorAddon",
    "local_logger": "zae_trainer.addons.local_logger:LocalLoggerAddon",
    "wandb": "zae_trainer.addons.wandb_logger:WandBLoggerAddon",
    "neptune": "zae_trainer.addons.neptune_logger:NeptuneLoggerAddon",
    "mlflow": "zae_trainer.addons.mlflow_logger:MLflowLoggerAddon",
    "multi_gpu": "zae_trainer.addons.multi_gpu:MultiGPUAddon",
    "fsdp": "zae_trainer.addons.distributed.fsdp:FSDPAddon",
    "accelerate": "zae_trainer.addons.accelerate:AccelerateAddon",
}


@dataclass(frozen=True)
class AddOnEntry:
    """Where a named add-on comes from."""

    name: str
    target: str  # "module:attribute"
    distribution: str  # "zae_trainer" for built-ins

    def load(self) -> type[AddOn] | type[AddOnBase]:
        module, _, attr = self.target.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if not (isinstance(obj, type) and issubclass(obj, (AddOn, AddOnBase))):
            raise TypeError(
                f"add-on {self.name!r} from {self.distribution} points at {self.target}, which is not an "
                "AddOn subclass"
            )
        return obj


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


@lru_cache(maxsize=1)
def entries() -> dict[str, AddOnEntry]:
    """Every named add-on, built-in and installed. Clashing names raise, naming both sources."""
    found: dict[str, AddOnEntry] = {}
    for alias, target in BUILTIN_ADDONS.items():
        found[_normalise(alias)] = AddOnEntry(alias, target, "zae_trainer")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "<unknown distribution>"
        key = _normalise(ep.name)
        prior = found.get(key)
        if prior is not None and prior.target != ep.value:
            raise RuntimeError(
                f"add-on name {ep.name!r} is registered twice: by {prior.distribution} ({prior.target}) and "
                f"by {dist} ({ep.value}). Uninstall one, or import the add-on class directly instead of "
                "naming it."
            )
        found[key] = AddOnEntry(ep.name, ep.value, dist)
    return found


def aliases_of(cls: type) -> frozenset[str]:
    """The names ``cls`` answers to: its ``name``, its class name and its registered names.

    So ``runs_after = ("gradient_clipping",)`` and ``("GradientClippingAddon",)`` mean the same.
    Compared case- and dash-insensitively.
    """
    target = f"{cls.__module__}:{cls.__qualname__}"
    names = {_normalise(getattr(cls, "name", "") or cls.__name__), _normalise(cls.__name__)}
    try:
        table = entries()
    except RuntimeError:  # a name clash between plugins is reported where a name is resolved
        table = {_normalise(a): AddOnEntry(a, t, "zae_trainer") for a, t in BUILTIN_ADDONS.items()}
    names.update(key for key, entry in table.items() if entry.target == target)
    return frozenset(names)


def normalise(name: str) -> str:
    """A name as the registry compares it (case- and dash-insensitive)."""
    return _normalise(name)


def resolve(name: str) -> type[AddOn] | type[AddOnBase]:
    """The add-on class registered under ``name``; ``KeyError`` lists the close names."""
    table = entries()
    entry = table.get(_normalise(name))
    if entry is None:
        close = difflib.get_close_matches(_normalise(name), sorted(table), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(
            f"no add-on named {name!r}.{hint} Known names: {sorted(table) or '(none)'}. Third-party add-ons "
            f"register under the {ENTRY_POINT_GROUP!r} entry-point group."
        )
    return entry.load()
