"""What the logger add-ons share: when they log, what they log, and how they fail.

Every logger (:class:`~zae_trainer.addons.local_logger.LocalLoggerAddon`, the W&B and the
Neptune add-on) is a :class:`LoggerAddOn`. The base class owns the lifecycle, so each
backend only writes records:

* ``RUN_BEGIN`` — the backend starts (``_open``) and records the run configuration
  (:func:`run_config`: ``trainer.config`` plus the trainer's, model's, optimizer's and add-ons'
  settings, secrets redacted);
* ``LOG`` — the step metrics the core converted at this log point (``train/*``, plus what
  earlier add-ons added: ``train/grad_norm``, ``throughput/*``) and the learning rate(s), at
  step ``progress_checker.step``;
* ``EPOCH_END`` — the epoch metrics (``train/*``, ``valid/*``), at the same step axis;
* ``RUN_END`` — the summary (:func:`run_summary`), then the backend closes, marked failed
  when ``EXCEPTION`` fired.

Why the base class catches every backend error: experiment tracking must never kill a run. A
backend that raises is disabled for the rest of the run with one
:class:`LoggingBackendWarning`; later errors of the same run go to the ``zae_trainer`` logger.
Only the main process logs (``trainer.is_main_process``): other ranks return at once and never
wait on a backend.

``order = 100`` puts loggers after every other add-on on ``LOG``, so the metrics dict already
holds what throughput and gradient-norm add-ons put in it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any, Callable, ClassVar

import torch

from ..addon import REQUIRED, AddOn

__all__ = [
    "LoggerAddOn",
    "LoggingBackendWarning",
    "learning_rates",
    "run_config",
    "run_summary",
    "epoch_record",
    "to_plain",
    "check_web_logger",
    "best_checkpoint_path",
    "is_finite_number",
    "EPOCH_PREFIX",
]

_log = logging.getLogger("zae_trainer")

#: Web backends and TensorBoard keep one flat namespace per run, where the epoch mean
#: ``train/loss`` would overwrite the step value ``train/loss`` logged at the same step.
#: Epoch metrics therefore go under this prefix there (``epoch/valid/loss``).
EPOCH_PREFIX = "epoch/"

_SECRET = re.compile(r"token|tkn|key|secret|password|credential", re.IGNORECASE)
_WEB_BACKENDS = ("wandb", "neptune")


class LoggingBackendWarning(RuntimeWarning):
    """A logging backend could not start, fell back to offline mode, or failed mid-run."""


class LoggerAddOn(AddOn):
    """Base class of logger add-ons: lifecycle, rank-0 gating and fault isolation.

    Subclasses implement ``_open``, ``_write_step``, ``_write_epoch`` and ``_close``, and may
    override ``_write_config`` and ``_write_summary``. None of them needs to catch anything.
    """

    order = 100
    #: The backend's name in warnings ("W&B").
    backend: ClassVar[str] = "logger"

    def __init__(self) -> None:
        self._active = False  # a backend session is open and healthy
        self._warned = False  # this run already warned once
        self._failed_run = False

    # -- what subclasses write ------------------------------------------------------
    def _open(self, trainer: Any) -> bool:
        """Start the backend; return False to stay inactive without a warning."""
        raise NotImplementedError

    def _write_config(self, config: dict[str, Any]) -> None:
        """Record the run configuration (once, right after ``_open``)."""

    def _write_step(self, step: int, record: dict[str, float]) -> None:
        raise NotImplementedError

    def _write_epoch(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def _write_summary(self, trainer: Any, summary: dict[str, Any]) -> None:
        """Record the final summary (before ``_close``)."""

    def _close(self, failed: bool) -> None:
        raise NotImplementedError

    # -- hooks ----------------------------------------------------------------------
    def on_run_begin(self, trainer: Any) -> None:
        if not trainer.is_main_process:
            return
        self._warned = False
        self._failed_run = False
        opened = self._guarded("start", self._open, trainer)
        if opened:
            self._active = True
            self._guarded("record the run configuration", self._write_config, run_config(trainer))

    def on_log(self, trainer: Any, metrics: Mapping[str, float]) -> None:
        if not self._active:
            return
        record = dict(metrics)
        record.update(learning_rates(trainer))
        self._guarded("log step metrics", self._write_step, trainer.progress_checker.step, record)

    def on_epoch_end(self, trainer: Any) -> None:
        if not self._active:
            return
        pc = trainer.progress_checker
        self._guarded("log epoch metrics", self._write_epoch, pc.step, pc.epoch, dict(trainer.epoch_metrics))

    def on_exception(self, trainer: Any, exception: BaseException) -> None:
        self._failed_run = True

    def on_run_end(self, trainer: Any) -> None:
        if not self._active:
            return
        failed = self._failed_run or trainer.summary.status == "failed"
        self._guarded("record the summary", self._write_summary, trainer, run_summary(trainer))
        if self._active:
            self._active = False
            self._guarded("finish the run", self._close, failed)

    # -- fault isolation --------------------------------------------------------------
    def _guarded(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn``; on an error, disable this backend for the run and warn once."""
        try:
            return fn(*args)
        except Exception as exc:
            self._disable(what, exc)
            return None

    def _disable(self, what: str, exc: BaseException) -> None:
        was_active, self._active = self._active, False
        message = (
            f"{self.backend} logging failed to {what} ({type(exc).__name__}: {exc}); it is disabled for the "
            "rest of this run and training continues."
        )
        self._warn(message)
        if was_active:  # end the backend's session so what it already has is kept
            try:
                self._close(False)
            except Exception as close_exc:
                _log.debug("%s: closing after a failure raised %r", self.backend, close_exc)

    def _warn(self, message: str) -> None:
        """One warning per run; anything after it goes to the ``zae_trainer`` logger."""
        if self._warned:
            _log.warning(message)
            return
        self._warned = True
        warnings.warn(message, LoggingBackendWarning, stacklevel=3)


# ======================================================================================
# What gets logged
# ======================================================================================
def learning_rates(trainer: Any) -> dict[str, float]:
    """``{"lr": x}`` for one parameter group, ``{"lr/group0": x, ...}`` for several."""
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is None:
        return {}
    groups = optimizer.param_groups
    values = [_number(g.get("lr")) for g in groups]
    if len(values) == 1:
        return {"lr": values[0]} if values[0] is not None else {}
    return {f"lr/group{i}": v for i, v in enumerate(values) if v is not None}


def epoch_record(epoch: int, metrics: Mapping[str, float]) -> dict[str, float]:
    """Epoch metrics named for a flat namespace: ``epoch/index`` and ``epoch/<metric>``."""
    record: dict[str, float] = {f"{EPOCH_PREFIX}index": epoch}
    record.update({EPOCH_PREFIX + k: v for k, v in metrics.items()})
    return record


def run_config(trainer: Any) -> dict[str, Any]:
    """The run's configuration: ``trainer.config`` at the top level, the rest under ``zae_trainer``.

    Only plain values; anything whose key looks like a secret (token, key, password) is
    replaced by ``"<redacted>"`` so an API token never reaches a dashboard.
    """
    model = trainer.raw_model
    optimizer = trainer.optimizer
    scheduler = trainer.scheduler
    info: dict[str, Any] = {
        "trainer": {
            "class": type(trainer).__name__,
            "device": str(trainer.device),
            "world_size": trainer.world_size,
            "log_every_n_steps": trainer.log_every_n_steps,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "gradient_clip": trainer.gradient_clip,
            "monitor": trainer.monitor,
            "monitor_mode": trainer.monitor_mode,
        },
        "model": {
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        },
        "optimizer": (
            {"class": type(optimizer).__name__, **dict(optimizer.defaults)} if optimizer is not None else None
        ),
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "addons": {a.name: _addon_settings(a) for a in trainer.addon_instances},
    }
    config: dict[str, Any] = to_plain(trainer.config)
    config["zae_trainer"] = to_plain(info)
    return config


def run_summary(trainer: Any) -> dict[str, Any]:
    """The final numbers of a run (from ``trainer.summary``), flat, plain values."""
    s = trainer.summary
    return {
        "status": s.status,
        "epochs": s.epochs,
        "steps": s.steps,
        "samples": s.samples,
        "seconds": s.seconds,
        "stop_reason": s.stop_reason,
        "best/metric": s.monitor,
        "best/value": s.best_value,
        "best/epoch": s.best_epoch,
    }


def best_checkpoint_path(trainer: Any) -> str | None:
    """The state manager's best checkpoint (file or safetensors folder), or None.

    Waits for a background (``async_save``) write first, so the file is complete.
    """
    from .checkpoint.manifest import Manifest
    from .state_manager import StateManagerAddon

    try:
        manager = trainer.get_addon(StateManagerAddon)
    except KeyError:
        return None

    manager.wait_for_checkpoint()
    entry = Manifest.load(manager.save_path, mode=trainer.monitor_mode).best()
    if entry is None:
        return None
    path = os.path.join(manager.save_path, entry.name)
    return path if os.path.exists(path) else None


def _addon_settings(addon: AddOn) -> dict[str, Any]:
    defaults = {k: v for k, v in type(addon).settings().items() if v is not REQUIRED}
    settings: dict[str, Any] = to_plain({**defaults, **addon._given_settings})
    return settings


def to_plain(value: Any, key: str = "") -> Any:
    """``value`` as JSON-able plain data (str keys), secrets redacted by key name."""
    if key and _SECRET.search(key) and value is not None and not isinstance(value, (Mapping, bool)):
        return "<redacted>"
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else f"tensor{tuple(value.shape)}"
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if hasattr(value, "__fspath__"):
        return str(value)
    return repr(value)


def check_web_logger(web_logger: Any, owner: str) -> dict[str, dict[str, Any]]:
    """Validate zae-engine's ``web_logger={"wandb": {...}, "neptune": {...}}`` setting."""
    if web_logger is None:
        return {}
    if not isinstance(web_logger, Mapping):
        raise TypeError(
            f"{owner}: web_logger must be a dict such as {{'wandb': {{'project': 'p'}}}}, got "
            f"{type(web_logger).__name__}"
        )
    unknown = [k for k in web_logger if k not in _WEB_BACKENDS]
    if unknown:
        raise ValueError(
            f"{owner}: web_logger has unknown backend(s) {unknown}; known: {list(_WEB_BACKENDS)}. To fix, rename "
            "the key, or use LocalLoggerAddon for files on disk."
        )
    checked: dict[str, dict[str, Any]] = {}
    for backend, options in web_logger.items():
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise TypeError(
                f"{owner}: web_logger[{backend!r}] must be a dict of keyword arguments for the backend's init "
                f"function, got {type(options).__name__}"
            )
        checked[backend] = dict(options)
    return checked


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):  # capturable optimizers keep lr as a tensor
        value = value.item()
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


def is_finite_number(value: Any) -> bool:
    """True for an int or a finite float (not bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
