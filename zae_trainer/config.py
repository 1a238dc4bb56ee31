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
import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import yaml
from torch import nn

from .errors import TrainerConfigError
from .registry import resolve
from .supervised import SupervisedTrainer
from .losses import LOSSES

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


class ConfigError(TrainerConfigError):
    """A config is invalid; ``path`` is the dotted key path of the offending entry.

    ``prefix`` is what the path is shown under: ``"config."`` for config files and dicts;
    keyword construction (``SupervisedTrainer(loss="...")``) names the argument instead.
    """

    def __init__(self, path: str, message: str, prefix: str = "config.") -> None:
        super().__init__(f"{prefix}{path}: {message}")
        self.path = path


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
