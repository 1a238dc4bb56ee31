"""Objects from names: the optimizer, scheduler, loss and import-path builders that configs,
the command line and ``SupervisedTrainer(optimizer="AdamW", loss="cross_entropy")`` share.

They live apart from :mod:`zae_trainer.config` (YAML files, whole trainers) so that the
trainer classes can build objects from names without importing the config front end: the
package's import graph stays without cycles (``tests/test_core_imports.py``). Every error is
a :class:`ConfigError` naming the key path (or keyword) and the closest valid names.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .errors import TrainerConfigError
from .losses import LOSSES

__all__ = ["ConfigError", "import_object", "build_optimizer", "build_scheduler", "build_loss"]


class ConfigError(TrainerConfigError):
    """A config is invalid; ``path`` is the dotted key path of the offending entry.

    ``prefix`` is what the path is shown under: ``"config."`` for config files and dicts;
    keyword construction (``SupervisedTrainer(loss="...")``) names the argument instead.
    """

    def __init__(self, path: str, message: str, prefix: str = "config.") -> None:
        super().__init__(f"{prefix}{path}: {message}")
        self.path = path


def import_object(path: str, where: str = "<import>", base_dir: str | os.PathLike[str] | None = None) -> Any:
    """``"package.module:attr"``, ``"package.module.attr"`` or ``"file.py:attr"`` -> the object.

    A module that cannot be imported from ``sys.path`` is looked for in ``base_dir`` (the
    config file's folder); a ``.py`` file is relative to ``base_dir`` (else the working
    directory). Either way the folder that holds it is appended to ``sys.path``, as Python does
    for a script's folder, so that pickled objects from it load in spawned processes too.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(where, f"{path!r} is not an import path like 'package.module:name' or 'file.py:name'")
    if module_name.endswith(".py"):
        file = Path(base_dir or ".", module_name)
        if not file.is_file():
            raise ConfigError(where, f"{path!r}: no file {str(file)!r} (a .py path is relative to the config's folder)")
        _add_to_sys_path(file.resolve().parent)
        module_name = file.stem
        obj: Any = _import(module_name, path, where)
    else:
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if base_dir is None or not _missing_is_top(exc, module_name):
                raise ConfigError(where, f"cannot import module {module_name!r} ({exc})") from None
            _add_to_sys_path(Path(base_dir).resolve())
            obj = _import(module_name, path, where, f" (looked on sys.path and in {str(base_dir)!r})")
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(where, f"module {module_name!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    return obj


def _missing_is_top(exc: ModuleNotFoundError, module_name: str) -> bool:
    """Whether the module itself is missing (not a module it imports: that error is the user's)."""
    return exc.name is not None and module_name.split(".")[0] == exc.name.split(".")[0]


def _import(module_name: str, path: str, where: str, looked: str = "") -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if _missing_is_top(exc, module_name):
            raise ConfigError(where, f"cannot import module {module_name!r} for {path!r}{looked}") from None
        raise  # the user's module failed to import something: keep its traceback


def _add_to_sys_path(folder: Path) -> None:
    entry = str(folder)
    if entry not in sys.path:
        sys.path.append(entry)
    importlib.invalidate_caches()


# -- building --------------------------------------------------------------------------------------


def _split_named(entry: Any, path: str, prefix: str = "config.") -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, Mapping):
        options = dict(entry)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"{path}.name", "missing: give the class name, e.g. {name: Adam, lr: 0.001}", prefix)
        return name, options
    raise ConfigError(path, f"expected a name or a mapping with 'name', got {type(entry).__name__}", prefix)


def _from_namespace(
    namespace: Any, name: str, base: type, path: str, kind: str, prefix: str = "config.", extra: Iterable[str] = ()
) -> type:
    candidates = {n: getattr(namespace, n) for n in dir(namespace) if not n.startswith("_")}
    classes = {n: c for n, c in candidates.items() if isinstance(c, type) and issubclass(c, base) and c is not base}
    if name in classes:
        return classes[name]
    if ":" in name or "." in name:
        obj = import_object(name, path)
        if isinstance(obj, type) and issubclass(obj, base):
            return obj
        raise ConfigError(path, f"{name!r} is not {_a(kind)}", prefix)
    known = sorted([*classes, *extra])
    same_letters = [k for k in known if k.lower() == name.lower()]
    close = same_letters or difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else f" Known: {known}."
    raise ConfigError(path, f"{name!r} is not {_a(kind)} in {namespace.__name__}.{hint}", prefix)


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _construct(cls: Any, args: Mapping[str, Any], path: str, *positional: Any, user_code: bool = False,
               prefix: str = "config.") -> Any:
    """``cls(*positional, **args)``, with settings checked against its signature first.

    A setting ``cls`` does not take is reported at ``path.<setting>`` with the closest valid
    name; a missing one at ``path``. Errors raised by library classes (an optimizer refusing
    ``lr=-1``) become :class:`ConfigError`; with ``user_code=True`` (the user's model and data
    factories) they propagate unchanged, traceback included.
    """
    name = getattr(cls, "__name__", repr(cls))
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no signature available (some builtins): let the call decide
        signature = None
    if signature is not None:
        params = list(signature.parameters.values())
        open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
        named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        valid = named if any(p.kind is p.VAR_POSITIONAL for p in params) else named[len(positional):]
        unknown = [] if open_ended else [k for k in args if k not in valid]
        if unknown:
            close = difflib.get_close_matches(unknown[0], valid, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{path}.{unknown[0]}", f"{name} has no setting {unknown[0]!r}.{hint} Valid settings: {valid}", prefix
            )
        try:
            signature.bind(*positional, **args)
        except TypeError as exc:
            raise ConfigError(path, f"{name}({', '.join(sorted(args))}): {exc}", prefix) from None
    if user_code:
        return cls(*positional, **args)
    try:
        return cls(*positional, **args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(path, f"{name}({', '.join(sorted(args))}) failed: {exc}", prefix) from None


def build_optimizer(entry: Any, params: Any, path: str = "optimizer", prefix: str = "config.") -> torch.optim.Optimizer:
    """A ``torch.optim`` optimizer from ``"AdamW"`` or ``{name: AdamW, lr: 0.001, ...}`` over ``params``.

    ``name`` may also be an import path to an ``Optimizer`` subclass. Unknown names and
    settings raise :class:`ConfigError` at ``path`` with the closest valid ones.
    """
    name, options = _split_named(entry, path, prefix)
    opt_cls = _from_namespace(torch.optim, name, torch.optim.Optimizer, f"{path}.name", "optimizer", prefix)
    optimizer: torch.optim.Optimizer = _construct(opt_cls, options, path, params, prefix=prefix)
    return optimizer


def build_scheduler(
    entry: Any, optimizer: torch.optim.Optimizer, path: str = "scheduler", prefix: str = "config."
) -> tuple[Any, bool | None]:
    """An LR scheduler from a name or ``{name: StepLR, step_size: 3, step_on_batch: false}``.

    Returns ``(scheduler, step_on_batch)``; ``step_on_batch`` is None when not given.
    """
    name, options = _split_named(entry, path, prefix)
    step_on_batch = bool(options.pop("step_on_batch")) if "step_on_batch" in options else None
    if name == "ReduceLROnPlateau":
        sched_cls: Any = torch.optim.lr_scheduler.ReduceLROnPlateau
    else:
        sched_cls = _from_namespace(
            torch.optim.lr_scheduler, name, torch.optim.lr_scheduler.LRScheduler, f"{path}.name", "LR scheduler",
            prefix, extra=("ReduceLROnPlateau",),
        )
    return _construct(sched_cls, options, path, optimizer, prefix=prefix), step_on_batch


def build_loss(entry: Any, path: str = "loss", prefix: str = "config.") -> Any:
    """A loss module from a name and options: ours (``cross_entropy``, ``bce``) or ``torch.nn``'s.

    ``"CrossEntropyLoss"``, ``{name: cross_entropy, label_smoothing: 0.1}``, an import path, or
    ``None`` (returns None). Unknown names and settings raise :class:`ConfigError` now, not
    at the first step.
    """
    if entry is None:
        return None
    name, options = _split_named(entry, path, prefix)
    if name in LOSSES:
        return _construct(LOSSES[name], options, path, prefix=prefix)
    cls = _from_namespace(nn, name, nn.Module, f"{path}.name", "loss", prefix, extra=LOSSES)
    if not cls.__name__.endswith("Loss"):
        raise ConfigError(f"{path}.name", f"{name!r} is a torch.nn module but not a loss", prefix)
    if "label_smoothing" in options and cls in (nn.BCEWithLogitsLoss, nn.BCELoss):
        raise ConfigError(
            f"{path}.label_smoothing",
            f"torch's {cls.__name__} does not smooth labels. To fix, name 'bce' "
            "(zae_trainer.losses.BinaryCrossEntropyLoss: the same loss, with label_smoothing"
            + (" and from_logits=False" if cls is nn.BCELoss else "") + ").",
            prefix,
        )
    return _construct(cls, options, path, prefix=prefix)
