"""Trainers from a dict or a YAML file: ``from_config(config)`` (``zae_trainer.from_config``).

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

Numbers are read as YAML 1.2 reads them: ``lr: 3e-3`` and ``--set optimizer.lr=3e-3`` are the
float 0.003 (YAML 1.1, PyYAML's default, would read a string). Import paths that do not
resolve from ``sys.path`` are looked up beside the config file: ``digits_factories:make_model``
or ``models/net.py:Net`` next to ``config.yaml`` (its folder is then added to ``sys.path``, so
spawned worker processes import the same module).
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from torch import nn

from .builders import (
    ConfigError,
    _construct,
    _split_named,
    build_loss,
    build_optimizer,
    build_scheduler,
    import_object,
)
from .registry import resolve
from .supervised import SupervisedTrainer

__all__ = [
    "ConfigError",
    "load_config",
    "apply_overrides",
    "import_object",
    "build_trainer",
    "from_config",
    "build_data",
    "build_optimizer",
    "build_scheduler",
    "build_loss",
    "fit",
    "run_length",
    "parse_value",
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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: ``3e-3``, ``1e5``, ``-2E+4`` are numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A YAML scalar or collection as the config loader reads it (``"3e-3"`` -> ``0.003``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# -- reading -----------------------------------------------------------------------------------


def load_config(source: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """A copy of ``source`` (its dicts and lists; objects in it, a model say, are shared),
    or the mapping in a YAML/JSON file."""
    if isinstance(source, Mapping):
        copied: dict[str, Any] = _copy_containers(source)
        return copied
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
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
        try:
            value = parse_value(raw) if raw else None
        except yaml.YAMLError as exc:
            raise ConfigError(key, f"the value {raw!r} is not valid YAML: {exc}") from None
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


def _build_model(config: Mapping[str, Any], base_dir: str | None) -> nn.Module:
    entry = config.get("model")
    if entry is None:
        raise ConfigError("model", "missing: give an nn.Module, or an import path to a module class or factory")
    args = dict(config.get("model_args") or {})
    args_path = "model_args"
    if isinstance(entry, Mapping):
        args_path = "model"
        args.update({k: v for k, v in entry.items() if k != "target"})
        entry = entry.get("target")
        if entry is None:
            raise ConfigError("model.target", "missing: the import path of the model class or factory")
    if isinstance(entry, nn.Module):
        if args:
            raise ConfigError("model_args", "given, but the model is already an object")
        return entry
    if isinstance(entry, str):
        entry = import_object(entry, "model", base_dir)
    if not callable(entry):
        raise ConfigError("model", f"expected an nn.Module or a callable returning one, got {type(entry).__name__}")
    model = _construct(entry, args, args_path, user_code=True)
    if not isinstance(model, nn.Module):
        raise ConfigError("model", f"the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_addons(entry: Any) -> list[Any]:

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
                close = difflib.get_close_matches(unknown[0], sorted(accepted), n=1, cutoff=0.5)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"{path}.{unknown[0]}",
                    f"add-on {name!r} has no setting {unknown[0]!r}.{hint} Valid settings: {sorted(accepted)}",
                )
            built.append(_construct(cls, options, path))
        else:
            built.append(cls)
    return built


def _resolve_source(
    config: Mapping[str, Any] | str | os.PathLike[str], base_dir: str | os.PathLike[str] | None
) -> tuple[dict[str, Any], str | None]:
    """The config as a dict, and the folder its import paths are relative to."""
    if base_dir is None and not isinstance(config, Mapping):
        base_dir = Path(config).resolve().parent
    return load_config(config), (os.fspath(base_dir) if base_dir is not None else None)


def build_trainer(
    config: Mapping[str, Any] | str | os.PathLike[str],
    cls: type | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """Build a trainer (by default a :class:`SupervisedTrainer`) from ``config``.

    ``base_dir`` is where import paths that ``sys.path`` does not resolve are looked up:
    by default the config file's folder (none for a dict).
    """
    conf, base = _resolve_source(config, base_dir)
    unknown = sorted(set(conf) - set(TOP_LEVEL_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], TOP_LEVEL_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(unknown[0], f"unknown key{hint}; accepted top-level keys: {list(TOP_LEVEL_KEYS)}")
    trainer_cls: Any = cls if cls is not None and not inspect.isabstract(cls) else SupervisedTrainer
    settings = conf.get("trainer") or {}
    if not isinstance(settings, Mapping):
        raise ConfigError("trainer", f"expected a mapping of trainer settings, got {type(settings).__name__}")
    settings = dict(settings)
    mode = settings.pop("mode", "train")
    device = settings.pop("device", None)
    model = _build_model(conf, base)

    optimizer = None
    if conf.get("optimizer") is not None:
        optimizer = build_optimizer(conf["optimizer"], model.parameters())
    elif mode == "train":
        raise ConfigError("optimizer", "missing: training needs e.g. {name: Adam, lr: 0.001}")

    scheduler = None
    if conf.get("scheduler") is not None:
        if optimizer is None:
            raise ConfigError("scheduler", "a scheduler needs an optimizer")
        scheduler, step_on_batch = build_scheduler(conf["scheduler"], optimizer)
        if step_on_batch is not None:
            settings["scheduler_step_on_batch"] = step_on_batch

    loss = build_loss(conf.get("loss"))
    addons = _build_addons(conf.get("addons"))
    built_cls = trainer_cls.add_on(*addons) if addons else trainer_cls
    given = sorted(settings)  # the keys the user wrote, for error paths
    if conf.get("config") is not None:
        settings["config"] = conf["config"]
    settings.setdefault("config", _plain_config(conf))
    accepts_loss = "loss_fn" in inspect.signature(trainer_cls).parameters
    if accepts_loss and loss is not None:
        settings["loss_fn"] = loss
    try:
        trainer = built_cls(model, device, mode, optimizer, scheduler, **settings)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(_setting_path(str(exc), ["mode", "device", *given]), str(exc)) from exc
    if loss is not None and not accepts_loss:
        trainer.loss_fn = loss  # for user subclasses that read self.loss_fn
    return trainer


def from_config(
    config: Mapping[str, Any] | str | os.PathLike[str],
    trainer_cls: type | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """Build a trainer from a dict or a YAML file (was ``Trainer.from_config``).

    ``trainer_cls`` is the trainer class to build (a concrete ``Trainer`` subclass, with the
    config's add-ons composed onto it); by default a :class:`SupervisedTrainer`. It lives
    here, not on ``Trainer``, so that the core never imports its own front end.

    Examples
    --------
    >>> from zae_trainer import from_config
    >>> trainer = from_config("examples/digits.yaml")  # doctest: +SKIP
    >>> trainer = from_config({"model": model, "optimizer": "Adam"}, MyTrainer)  # doctest: +SKIP
    """
    return build_trainer(config, trainer_cls, base_dir)

def _setting_path(message: str, keys: Iterable[str]) -> str:
    """``trainer.<key>`` for the first setting named in ``message`` (as a whole word), else ``trainer``."""
    found = [
        (match.start(), key)
        for key in keys
        for match in [re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message)]
        if match is not None
    ]
    return f"trainer.{min(found)[1]}" if found else "trainer"


def build_data(
    config: Mapping[str, Any] | str | os.PathLike[str], base_dir: str | os.PathLike[str] | None = None
) -> tuple[Any, Any]:
    """Call ``data.target`` with the other ``data`` keys; return ``(train_loader, valid_loader)``."""
    conf, base = _resolve_source(config, base_dir)
    entry = conf.get("data")
    if entry is None:
        raise ConfigError("data", "missing: give {target: package.module:make_data, ...options}")
    if isinstance(entry, str):
        entry = {"target": entry}
    if not isinstance(entry, Mapping) or "target" not in entry:
        raise ConfigError("data.target", "missing: the import path of a function returning (train, valid) loaders")
    options = {k: v for k, v in entry.items() if k != "target"}
    factory = import_object(entry["target"], "data.target", base)
    result = _construct(factory, options, "data", user_code=True)
    if isinstance(result, Mapping):
        return result.get("train"), result.get("valid")
    if isinstance(result, tuple) and len(result) == 2:
        return result[0], result[1]
    return result, None


def run_length(config: Mapping[str, Any]) -> int:
    """``run.n_epoch`` (alias ``run.epochs``), checked."""
    run = config.get("run") or {}
    if not isinstance(run, Mapping):
        raise ConfigError("run", f"expected a mapping such as {{n_epoch: 10}}, got {type(run).__name__}")
    run = dict(run)
    n_epoch = run.pop("n_epoch", run.pop("epochs", None))
    if isinstance(n_epoch, bool) or not isinstance(n_epoch, int) or n_epoch < 1:
        raise ConfigError("run.n_epoch", f"must be an integer >= 1, got {n_epoch!r}")
    if run:
        key = sorted(run)[0]
        close = difflib.get_close_matches(key, ["n_epoch", "epochs"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"run.{key}", f"unknown key{hint}; run accepts n_epoch")
    return n_epoch


def fit(
    config: Mapping[str, Any] | str | os.PathLike[str],
    cls: type | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """Build trainer and data from ``config`` and run ``run.n_epoch`` epochs; return the trainer."""
    conf, base = _resolve_source(config, base_dir)
    n_epoch = run_length(conf)
    trainer = build_trainer(conf, cls, base)
    train, valid = build_data(conf, base)
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

    result: dict[str, Any] = plain(conf)
    return result
