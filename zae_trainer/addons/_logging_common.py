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
* ``RUN_END`` — the summary (:func:`run_summary`), then the backend closes with the run's
  outcome: ``"finished"``, ``"failed"`` (``EXCEPTION`` fired) or ``"interrupted"``
  (``INTERRUPT``: SIGINT/SIGTERM), which each backend marks its own way;
* ``TEST_END`` — ``trainer.test()``'s ``test/*`` metrics, at step ``progress_checker.step``,
  with what was evaluated (:func:`test_record`: ``test/weights``, ``test/checkpoint``). A
  backend with sessions (W&B, Neptune, MLflow: ``test_needs_session``) writes them into the
  run of the last ``run()`` call: while it is open, directly; after ``RUN_END`` closed it, the
  backend reopens that same run (:meth:`LoggerAddOn._reopen`), writes, and closes it again
  with the outcome it had; before any ``run()``, it starts a run for the results. Each call
  replaces the single-valued results (the latest test() is what a dashboard shows), while
  the per-step records (W&B history, MLflow metric history, ``test.json``) keep every call.

Conventions every logger follows (what a user reads in any backend):

* epochs are 1-based wherever they appear: a step row logged during the first epoch says
  ``epoch 1``, and the row written when that epoch ends says ``epoch 1`` too;
* the run's clock (:attr:`LoggerAddOn.run_seconds`, the local logger's ``time`` column, the
  summary's ``seconds``) counts training seconds since the run's first start, carried across
  resumes through the checkpoint (each logger keeps ``{"seconds": ...}`` in its state), so it
  continues where the restored checkpoint left off; time a crashed process spent after its
  last checkpoint, and time between processes, are not counted. The summary's
  ``process_seconds`` is the last ``run()`` call alone.

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
import threading
import time
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
    "OUTCOMES",
    "is_secret_key",
    "call_with_timeout",
    "test_record",
]

_log = logging.getLogger("zae_trainer")

#: Web backends and TensorBoard keep one flat namespace per run, where the epoch mean
#: ``train/loss`` would overwrite the step value ``train/loss`` logged at the same step.
#: Epoch metrics therefore go under this prefix there (``epoch/valid/loss``).
EPOCH_PREFIX = "epoch/"

#: Credentials, matched as whole words of a key (``hf_token``, ``apiKey``, ``db_password``),
#: so that hyperparameters that merely contain the letters (``key_dim``, ``monkey``,
#: ``max_tokens``, ``tokenizer``, ``author``) are logged as they are.
_SECRET = re.compile(
    r"(?:^|_)(?:token|tkn|secret|secrets|password|passwd|passphrase|pwd|credential|credentials|auth"
    r"|api_?key|access_?key|private_?key|secret_?key|client_?secret)(?:_|$)"
)
_WEB_BACKENDS = ("wandb", "neptune")
#: The outcomes a backend is closed with.
OUTCOMES = ("finished", "failed", "interrupted")


class LoggingBackendWarning(RuntimeWarning):
    """A logging backend could not start, fell back to offline mode, or failed mid-run."""


class LoggerAddOn(AddOn):
    """Base class of logger add-ons: lifecycle, rank-0 gating and fault isolation.

    Subclasses implement ``_open``, ``_write_step``, ``_write_epoch`` and ``_close``, and may
    override ``_write_config`` and ``_write_summary``. None of them needs to catch anything.
    A subclass with state of its own extends :meth:`state_dict` / :meth:`load_state_dict`
    (``{**super().state_dict(), ...}``), so the run clock travels with it.
    """

    order = 100
    #: The backend's name in warnings ("W&B").
    backend: ClassVar[str] = "logger"
    #: True: ``_write_test`` writes into an open backend session, which ``TEST_END`` outside
    #: ``run()`` reopens with ``_reopen`` (False: it writes on its own, as the local files do).
    test_needs_session: ClassVar[bool] = False

    def __init__(self) -> None:
        self._active = False  # a backend session is open and healthy
        self._warned = False  # this run already warned once
        self._failed_run = False
        self._interrupted = False
        #: The signal that interrupted the last run (``INTERRUPT``), else None.
        self.interrupt_signal: int | None = None
        self._seconds_before = 0.0  # run seconds before this run() call (restored on resume)
        self._clock_started: float | None = None  # perf_counter() at this run()'s RUN_BEGIN
        self._last_outcome = "finished"  # how the last run() ended (a reopened run is closed with it)
        self._test_session = False  # the session is open only to record test() results

    # -- the run clock ----------------------------------------------------------------
    @property
    def run_seconds(self) -> float:
        """Training seconds since the run's first start, across resumes (see the module doc)."""
        if self._clock_started is None:
            return self._seconds_before
        return self._seconds_before + (time.perf_counter() - self._clock_started)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.run_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seconds_before = float(state.get("seconds", 0.0))
        if self._clock_started is not None:  # restored at RUN_BEGIN: the clock restarts from it
            self._clock_started = time.perf_counter()

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

    def _close(self, outcome: str) -> None:
        """End the backend's session; ``outcome`` is one of :data:`OUTCOMES`."""
        raise NotImplementedError

    def _write_test(self, trainer: Any, metrics: dict[str, float]) -> None:
        """Record ``trainer.test()``'s metrics; default: say they are not recorded."""
        self._warn(
            f"{self.backend} does not record trainer.test() results; they are returned by test() and "
            "LocalLoggerAddon writes them to test.json."
        )

    def _reopen(self, trainer: Any) -> bool:
        """Open the run the last ``run()`` logged to again (a new run if there was none), for
        test results after ``RUN_END`` closed it; return False to record nothing, quietly.
        Only called when ``test_needs_session``."""
        return False

    # -- hooks ----------------------------------------------------------------------
    def on_run_begin(self, trainer: Any) -> None:
        if not trainer.is_main_process:
            return
        self._warned = False
        self._failed_run = False
        self._interrupted = False
        self.interrupt_signal = None
        pc = trainer.progress_checker
        if pc.step == 0 and pc.epoch == 0 and pc.batches == 0:  # a fresh run: its clock starts at 0
            self._seconds_before = 0.0
        self._clock_started = time.perf_counter()
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

    def on_interrupt(self, trainer: Any, signum: int) -> None:
        self._interrupted = True
        self.interrupt_signal = int(signum)

    def on_test_end(self, trainer: Any, metrics: Mapping[str, float]) -> None:
        if not trainer.is_main_process:
            return
        if self._active or not self.test_needs_session:  # test() inside run(), or no session needed
            self._guarded("record test results", self._write_test, trainer, dict(metrics))
            return
        # test() outside run(): RUN_END closed the run (or none was started); open it for the results
        self._warned = False  # one warning for this test() call's results, as for a run
        self._test_session = True
        try:
            if self._guarded("reopen its run for the test results", self._reopen, trainer):
                self._active = True
                self._guarded("record test results", self._write_test, trainer, dict(metrics))
                if self._active:
                    self._active = False
                    self._guarded("close the run after the test results", self._close, self._last_outcome)
        finally:
            self._active = self._test_session = False

    def on_run_end(self, trainer: Any) -> None:
        # The trainer timed this run() call; on top of what earlier processes trained, that is
        # the run's total, and a fresh run's total equals its process_seconds exactly.
        process: Any = getattr(trainer.summary, "seconds", None)
        seconds = self._seconds_before + float(process) if is_finite_number(process) else self.run_seconds
        self._seconds_before, self._clock_started = seconds, None  # a later run() continues the clock
        if not self._active:
            return
        status = trainer.summary.status
        if self._failed_run or status == "failed":
            outcome = "failed"
        elif self._interrupted or status == "interrupted":
            outcome = "interrupted"
        else:
            outcome = "finished"
        self._last_outcome = outcome
        summary = run_summary(trainer, seconds)
        self._guarded("record the summary", self._write_summary, trainer, summary)
        if self._active:
            self._active = False
            self._guarded("finish the run", self._close, outcome)

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
            try:  # a run reopened for test results keeps the outcome its training had
                self._close(self._last_outcome if self._test_session else "finished")
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

    Only plain values; a value whose key names a credential (:func:`is_secret_key`: token,
    secret, password, api_key, ...) is replaced by ``"<redacted>"`` so an API token never
    reaches a dashboard, while hyperparameters such as ``key_dim`` are kept.
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


def run_summary(trainer: Any, seconds: float | None = None) -> dict[str, Any]:
    """The final numbers of a run (from ``trainer.summary``), flat, plain values.

    ``epochs``, ``steps``, ``samples`` and ``seconds`` cover the whole run, across resumes
    (``seconds``: the loggers' run clock when given); ``process_seconds`` covers the last
    ``run()`` call alone.
    """
    s = trainer.summary
    return {
        "status": s.status,
        "epochs": s.epochs,
        "steps": s.steps,
        "samples": s.samples,
        "seconds": s.seconds if seconds is None else seconds,
        "process_seconds": s.seconds,
        "stop_reason": s.stop_reason,
        "best/metric": s.monitor,
        "best/value": s.best_value,
        "best/epoch": s.best_epoch,
    }


def test_record(trainer: Any) -> dict[str, str]:
    """What the last ``trainer.test()`` evaluated, for the loggers to record beside its metrics.

    ``"test/weights"``: ``"best"``, ``"last"``, ``"best:<metric>"``, a path, or ``"current"``
    (``weights=None``: the model as it was); ``"test/checkpoint"``: the absolute path of the
    file or folder the weights were read from, ``""`` when none was loaded. Both keys are always
    there, so a later call never leaves an earlier call's checkpoint beside its own weights.
    """
    weights = getattr(trainer, "test_weights", None)
    record = {"test/weights": "current" if weights is None else str(weights), "test/checkpoint": ""}
    if weights is None or weights == "last":
        return record
    manager = next((a for a in trainer.addon_instances if a.name == "state_manager"), None)
    resolve = getattr(manager, "_resolve", None)
    try:
        path = resolve(str(weights)) if resolve is not None else str(weights)
    except Exception as exc:  # the manifest changed since: the weights name is still recorded
        _log.debug("test_record: cannot resolve %r: %r", weights, exc)
        return record
    record["test/checkpoint"] = os.path.abspath(path)
    return record


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


def is_secret_key(key: str) -> bool:
    """Whether a setting named ``key`` holds a credential, judged by its words.

    ``api_key``, ``apiKey``, ``hf_token``, ``db_password``, ``client_secret``, ``basic_auth``
    are; ``key_dim``, ``monkey``, ``max_tokens``, ``tokenizer``, ``author`` are not.

    Examples
    --------
    >>> [is_secret_key(k) for k in ("api_tkn", "apiKey", "key_dim", "monkey", "max_tokens")]
    [True, True, False, False, False]
    """
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key)  # camelCase -> camel_Case
    words = re.sub(r"[^a-z0-9]+", "_", words.lower())
    return _SECRET.search(words) is not None


def to_plain(value: Any, key: str = "") -> Any:
    """``value`` as JSON-able plain data (str keys), credentials redacted by key name."""
    if key and is_secret_key(key) and value is not None and not isinstance(value, (Mapping, bool)):
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


def call_with_timeout(
    factory: Callable[[], Any], timeout: float, what: str, cleanup: Callable[[Any], None] | None = None
) -> Any:
    """``factory()`` in a helper thread; ``TimeoutError`` naming ``what`` after ``timeout`` seconds.

    Why: clients retry an unreachable server for a minute or more, and training must not
    wait that long. The abandoned call keeps running in its daemon thread; if it completes
    later, ``cleanup(result)`` runs there (stop the run it created), and its errors go to the
    ``zae_trainer`` logger.
    """
    lock = threading.Lock()
    done = threading.Event()
    box: dict[str, Any] = {}
    abandoned = False

    def target() -> None:
        try:
            result = factory()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc
            done.set()
            return
        with lock:
            if not abandoned:
                box["result"] = result
                done.set()
                return
        if cleanup is not None:
            try:
                cleanup(result)
            except Exception as exc:  # nobody is listening any more
                _log.debug("cleaning up after an abandoned %s raised %r", what, exc)

    threading.Thread(target=target, name=f"zae-{what}", daemon=True).start()
    if not done.wait(timeout):
        with lock:
            if not done.is_set():
                abandoned = True
                raise TimeoutError(f"{what} did not return within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["result"]
