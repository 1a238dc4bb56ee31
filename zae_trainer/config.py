"""Trainers from a dict or a YAML file: ``Trainer.from_config(config)``.

A config names everything; objects are built from ``torch.optim``, ``torch.optim.lr_scheduler``,
``torch.nn`` / :mod:`zae_trainer.losses`, registered add-ons, and import paths::

    model: examples.digits_factories:make_model     # an nn.Module, or a factory returning one
    model_args: {hidden: 128}                       # keyword arguments for the factory
    data: {target: examples.digits_factories:make_data, batch_size: 64}   # -> (train, valid)
    optimizer: {name: AdamW, lr: 0.003, weight_decay: 0.0001}
    scheduler: {name: CosineAnnealingLR, T_max: 30, step_on_batch: false}  # optional
    loss: {name: cross_entropy, label_smoothing: 0.1}                      # optional
    addons: [gradient_clipping, {name: state_manager, save_path: runs/ckpt}]  # optional
    trainer: {device: cpu, log_every_n_steps: 10, monitor: valid/acc, monitor_mode: max}
    run: {n_epoch: 30}

Every error names the key path (``optimizer.name``) and what would be accepted.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import yaml
from torch import nn

from .errors import TrainerConfigError
from .losses import LOSSES

__all__ = [
    "ConfigError",
    "load_config",
    "apply_overrides",
    "import_object",
    "build_trainer",
    "build_data",
    "fit",
    "TOP_LEVEL_KEYS",
]

TOP_LEVEL_KEYS = (
    "model",
    "model_args",
    "data",
    "optimizer",
    "scheduler",
    "loss",
    "addons",
    "trainer",
    "run",
    "config",
)


class ConfigError(TrainerConfigError):
    """A config is invalid; ``path`` is the dotted key path of the offending entry."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"config.{path}: {message}")
        self.path = path


# -- reading -----------------------------------------------------------------------------------


def load_config(source: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """A copy of ``source`` (its dicts and lists; objects in it, a model say, are shared),
    or the mapping in a YAML/JSON file."""
    if isinstance(source, Mapping):
        return _copy_containers(source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError("<file>", f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    return dict(data)


def _copy_containers(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy_containers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_containers(v) for v in value]
    return value


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings (values parsed as YAML: ``3``, ``1e-3``, ``[a, b]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "an override must look like key.path=value, e.g. optimizer.lr=0.01")
        value = yaml.safe_load(raw) if raw else None
        node: Any = config
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, dict):
                raise ConfigError(".".join(parts[: depth + 1]), f"cannot set {key}: this entry is not a mapping")
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"cannot set {key}: its parent is not a mapping")
        node[parts[-1]] = value
    return config


def import_object(path: str, where: str = "<import>") -> Any:
    """``"package.module:attr"`` or ``"package.module.attr"`` -> the object."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(where, f"{path!r} is not an import path like 'package.module:name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(where, f"cannot import module {module_name!r} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(where, f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


# -- building --------------------------------------------------------------------------------------


def _split_named(entry: Any, path: str) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, Mapping):
        options = dict(entry)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"{path}.name", "missing: give the class name, e.g. {name: Adam, lr: 0.001}")
        return name, options
    raise ConfigError(path, f"expected a name or a mapping with 'name', got {type(entry).__name__}")


def _from_namespace(namespace: Any, name: str, base: type, path: str, kind: str) -> type:
    candidates = {n: getattr(namespace, n) for n in dir(namespace) if not n.startswith("_")}
    classes = {n: c for n, c in candidates.items() if isinstance(c, type) and issubclass(c, base) and c is not base}
    if name in classes:
        return classes[name]
    if ":" in name or "." in name:
        obj = import_object(name, path)
        if isinstance(obj, type) and issubclass(obj, base):
            return obj
        raise ConfigError(path, f"{name!r} is not {_a(kind)}")
    close = difflib.get_close_matches(name, sorted(classes), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(path, f"{name!r} is not {_a(kind)} in {namespace.__name__}.{hint}")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _construct(cls: Any, args: Mapping[str, Any], path: str, *positional: Any) -> Any:
    try:
        inspect.signature(cls).bind(*positional, **args)
    except TypeError as exc:
        raise ConfigError(path, f"{getattr(cls, '__name__', cls)} does not accept {sorted(args)}: {exc}") from None
    except ValueError:  # no signature available (some builtins): let the call decide
        pass
    try:
        return cls(*positional, **args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(path, f"{getattr(cls, '__name__', cls)}({', '.join(sorted(args))}) failed: {exc}") from None


def _build_model(config: Mapping[str, Any]) -> nn.Module:
    entry = config.get("model")
    if entry is None:
        raise ConfigError("model", "missing: give an nn.Module, or an import path to a module class or factory")
    args = dict(config.get("model_args") or {})
    if isinstance(entry, Mapping):
        args.update({k: v for k, v in entry.items() if k != "target"})
        entry = entry.get("target")
        if entry is None:
            raise ConfigError("model.target", "missing: the import path of the model class or factory")
    if isinstance(entry, nn.Module):
        if args:
            raise ConfigError("model_args", "given, but the model is already an object")
        return entry
    if isinstance(entry, str):
        entry = import_object(entry, "model")
    if not callable(entry):
        raise ConfigError("model", f"expected an nn.Module or a callable returning one, got {type(entry).__name__}")
    model = _construct(entry, args, "model")
    if not isinstance(model, nn.Module):
        raise ConfigError("model", f"the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_loss(entry: Any) -> Any:
    if entry is None:
        return None
    name, options = _split_named(entry, "loss")
    if name in LOSSES:
        return _construct(LOSSES[name], options, "loss")
    cls = _from_namespace(nn, name, nn.Module, "loss.name", "loss")
    if not cls.__name__.endswith("Loss"):
        raise ConfigError("loss.name", f"{name!r} is a torch.nn module but not a loss")
    return _construct(cls, options, "loss")


def _build_addons(entry: Any) -> list[Any]:
    from .registry import resolve

    if entry is None:
        return []
    items: list[tuple[str, dict[str, Any], str]] = []
    if isinstance(entry, Mapping):
        for name, settings in entry.items():
            if settings is not None and not isinstance(settings, Mapping):
                raise ConfigError(f"addons.{name}", "settings must be a mapping (or empty)")
            items.append((name, dict(settings or {}), f"addons.{name}"))
    elif isinstance(entry, list):
        for i, item in enumerate(entry):
            name, options = _split_named(item, f"addons[{i}]")
            items.append((name, options, f"addons[{i}]"))
    else:
        raise ConfigError("addons", f"expected a list or a mapping, got {type(entry).__name__}")
    built = []
    for name, options, path in items:
        try:
            cls = resolve(name)
        except KeyError as exc:
            raise ConfigError(path, str(exc.args[0])) from None
        if options:
            accepted = set(cls.settings()) if hasattr(cls, "settings") else set()
            open_ended = getattr(cls, "accepts_any_setting", lambda: False)()  # e.g. wandb.init kwargs
            unknown = [] if open_ended else sorted(set(options) - accepted)
            if unknown:
                raise ConfigError(
                    f"{path}.{unknown[0]}",
                    f"add-on {name!r} has no setting {unknown[0]!r}; it accepts {sorted(accepted)}",
                )
            built.append(_construct(cls, options, path))
        else:
            built.append(cls)
    return built


def build_trainer(config: Mapping[str, Any] | str | os.PathLike[str], cls: type | None = None) -> Any:
    """Build a trainer (by default a :class:`SupervisedTrainer`) from ``config``."""
    from .supervised import SupervisedTrainer

    conf = load_config(config)
    unknown = sorted(set(conf) - set(TOP_LEVEL_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], TOP_LEVEL_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(unknown[0], f"unknown key{hint}; accepted top-level keys: {list(TOP_LEVEL_KEYS)}")
    trainer_cls: Any = cls if cls is not None and not inspect.isabstract(cls) else SupervisedTrainer
    model = _build_model(conf)
    settings = dict(conf.get("trainer") or {})
    mode = settings.pop("mode", "train")
    device = settings.pop("device", None)

    optimizer = None
    if conf.get("optimizer") is not None:
        name, options = _split_named(conf["optimizer"], "optimizer")
        opt_cls = _from_namespace(torch.optim, name, torch.optim.Optimizer, "optimizer.name", "optimizer")
        optimizer = _construct(opt_cls, options, "optimizer", model.parameters())
    elif mode == "train":
        raise ConfigError("optimizer", "missing: training needs e.g. {name: Adam, lr: 0.001}")

    scheduler = None
    if conf.get("scheduler") is not None:
        if optimizer is None:
            raise ConfigError("scheduler", "a scheduler needs an optimizer")
        name, options = _split_named(conf["scheduler"], "scheduler")
        if "step_on_batch" in options:
            settings["scheduler_step_on_batch"] = bool(options.pop("step_on_batch"))
        sched_cls = _from_namespace(
            torch.optim.lr_scheduler, name, torch.optim.lr_scheduler.LRScheduler, "scheduler.name", "LR scheduler"
        ) if name != "ReduceLROnPlateau" else torch.optim.lr_scheduler.ReduceLROnPlateau
        scheduler = _construct(sched_cls, options, "scheduler", optimizer)

    loss = _build_loss(conf.get("loss"))
    addons = _build_addons(conf.get("addons"))
    built_cls = trainer_cls.add_on(*addons) if addons else trainer_cls
    if conf.get("config") is not None:
        settings["config"] = conf["config"]
    settings.setdefault("config", _plain_config(conf))
    accepts_loss = "loss_fn" in inspect.signature(trainer_cls).parameters
    if accepts_loss and loss is not None:
        settings["loss_fn"] = loss
    try:
        trainer = built_cls(model, device, mode, optimizer, scheduler, **settings)
    except TypeError as exc:
        raise ConfigError("trainer", str(exc)) from None
    if loss is not None and not accepts_loss:
        trainer.loss_fn = loss  # for user subclasses that read self.loss_fn
    return trainer


def build_data(config: Mapping[str, Any] | str | os.PathLike[str]) -> tuple[Any, Any]:
    """Call ``data.target`` with the other ``data`` keys; return ``(train_loader, valid_loader)``."""
    conf = load_config(config)
    entry = conf.get("data")
    if entry is None:
        raise ConfigError("data", "missing: give {target: package.module:make_data, ...options}")
    if isinstance(entry, str):
        entry = {"target": entry}
    if not isinstance(entry, Mapping) or "target" not in entry:
        raise ConfigError("data.target", "missing: the import path of a function returning (train, valid) loaders")
    options = {k: v for k, v in entry.items() if k != "target"}
    factory = import_object(entry["target"], "data.target")
    result = _construct(factory, options, "data")
    if isinstance(result, Mapping):
        return result.get("train"), result.get("valid")
    if isinstance(result, tuple) and len(result) == 2:
        return result[0], result[1]
    return result, None


def fit(config: Mapping[str, Any] | str | os.PathLike[str], cls: type | None = None) -> Any:
    """Build trainer and data from ``config`` and run ``run.n_epoch`` epochs; return the trainer."""
    conf = load_config(config)
    run = dict(conf.get("run") or {})
    n_epoch = run.pop("n_epoch", run.pop("epochs", None))
    if not isinstance(n_epoch, int) or n_epoch < 1:
        raise ConfigError("run.n_epoch", f"must be an integer >= 1, got {n_epoch!r}")
    if run:
        raise ConfigError(f"run.{sorted(run)[0]}", "unknown key; run accepts n_epoch")
    trainer = build_trainer(conf, cls)
    train, valid = build_data(conf)
    trainer.run(n_epoch, train, valid)
    return trainer


def _plain_config(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The config with objects replaced by their type names, for loggers and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        return type(value).__name__

    return plain(conf)
