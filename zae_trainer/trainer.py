"""The core training loop.

Subclass :class:`Trainer`, write ``train_step`` and ``test_step``, and call ``run``. Everything
optional — checkpoints, loggers, DDP, clipping, mixed precision — is an add-on composed with
``Trainer.add_on(...)``; the loop only emits :class:`~zae_trainer.events.Event` s.

The loop never converts a tensor to a Python number per step: step outputs are kept on the
device and read in one transfer per metric at log points and at epoch end.
"""

from __future__ import annotations

import abc
import contextlib
import math
import signal
import threading
import time
from collections import defaultdict
from typing import Any, Callable, ClassVar, ContextManager, Iterable, Literal, Mapping, Sequence

import torch
from torch import nn

from .addon import AddOn
from .compat import ZaeEngineCompat
from .composition import AddOnSpec, build_trainer_class, register_pickling, route_settings
from .display import ProgressDisplay, RunSummary
from .errors import (
    AddOnHookError,
    NonFiniteLossError,
    SkipStep,
    StepOutputError,
    TrainerConfigError,
    TrainingTerminated,
)
from .events import Event
from .metrics import MetricAccumulator
from .progress import ProgressChecker
from .seed import current_seed
from .transfer import DeviceLike, move_to_device, resolve_devices

__all__ = ["Trainer", "TrainerMeta"]

_MODES = ("train", "test")
_PASS_THROUGH = (SkipStep, AddOnHookError)

# The per-batch events, bound once: looking a member up on an Enum class costs about 130 ns,
# which the hot path would otherwise pay six times per step.
_TRAIN_BATCH_BEGIN = Event.TRAIN_BATCH_BEGIN
_BEFORE_BACKWARD = Event.BEFORE_BACKWARD
_AFTER_BACKWARD = Event.AFTER_BACKWARD
_BEFORE_OPTIMIZER_STEP = Event.BEFORE_OPTIMIZER_STEP
_AFTER_OPTIMIZER_STEP = Event.AFTER_OPTIMIZER_STEP
_TRAIN_BATCH_END = Event.TRAIN_BATCH_END


class TrainerMeta(abc.ABCMeta):
    """Metaclass of trainers: lets built classes pickle by recipe (base + add-ons)."""


register_pickling(TrainerMeta)


class Trainer(ZaeEngineCompat, metaclass=TrainerMeta):
    """Minimal training loop; subclass it and implement ``train_step`` and ``test_step``.

    Parameters
    ----------
    model : nn.Module
        The model; moved to ``device``.
    device : str, torch.device, list or None
        ``None`` / ``"auto"``: CUDA if available, else CPU. A list of devices needs a
        distributing add-on (``MultiGPUAddon``).
    mode : {"train", "test"}
        ``"test"`` makes ``run`` evaluate only.
    optimizer : torch.optim.Optimizer or None
        Must hold (some of) the model's parameters. Required in ``"train"`` mode.
    scheduler : LR scheduler or None
        Stepped per epoch, or per optimizer step with ``scheduler_step_on_batch=True``.
        ``ReduceLROnPlateau`` is stepped with the monitored metric.
    log_bar : bool
        Progress bar on an interactive stderr, one line per epoch otherwise.
    scheduler_step_on_batch : bool
        Step the scheduler after every optimizer step instead of every epoch.
    gradient_clip : float
        zae-engine's clipping: max total L2 norm of the gradients, 0 to disable.
    log_every_n_steps : int
        How often (in optimizer steps) step metrics are read from the device, logged and
        shown. The only per-step cost of logging is keeping a reference.
    valid_every_n_epochs : int
        Validate every N epochs (and always after the last).
    accumulate_grad_batches : int
        Optimizer step every N batches, loss scaled by 1/N.
    nonfinite_loss : {"raise", "ignore"}
        What to do with a NaN/Inf training loss, detected at the next log point (checked
        before any checkpoint is written). Use ``NonFiniteGuardAddon`` to skip such steps.
    monitor : str or None
        Metric that defines "best" for checkpoints, early stopping and plateau schedulers.
        Default: ``"valid/loss"`` when validating, else ``"train/loss"``.
    monitor_mode : {"min", "max"}
        Whether lower or higher ``monitor`` is better.
    non_blocking : bool
        Copy batches asynchronously from pinned memory.
    handle_signals : bool
        During ``run()``, turn SIGINT/SIGTERM into a clean stop at the next batch boundary
        (``Event.INTERRUPT`` fires first, then ``RUN_END``; SIGINT then raises
        ``KeyboardInterrupt``, SIGTERM ``TrainingTerminated``, a ``SystemExit`` with code 143).
        A second SIGINT interrupts at once. Installed only in the main thread, restored after.
    config : Mapping or None
        Run configuration and hyperparameters, recorded by loggers and checkpoints.
    **addon_settings
        Keyword settings routed to the add-ons that declare them.

    Examples
    --------
    >>> class MyTrainer(Trainer):
    ...     def train_step(self, batch):
    ...         x, y = batch
    ...         return {"loss": nn.functional.mse_loss(self.model(x), y)}
    ...     def test_step(self, batch):
    ...         return self.train_step(batch)
    """

    #: Add-on classes this trainer class was built with (``Trainer.add_on``).
    addons: ClassVar[tuple[type, ...]] = ()
    _zt_specs: ClassVar[tuple[AddOnSpec, ...]] = ()
    _zt_handlers: ClassVar[Mapping[Event, tuple[tuple[int, Callable[..., Any]], ...]]] = {}

    def __init__(
        self,
        model: nn.Module,
        device: DeviceLike = None,
        mode: str = "train",
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        *,
        log_bar: bool = True,
        scheduler_step_on_batch: bool = False,
        gradient_clip: float = 0.0,
        log_every_n_steps: int = 50,
        valid_every_n_epochs: int = 1,
        accumulate_grad_batches: int = 1,
        nonfinite_loss: Literal["raise", "ignore"] = "raise",
        monitor: str | None = None,
        monitor_mode: Literal["min", "max"] = "min",
        non_blocking: bool = True,
        handle_signals: bool = True,
        config: Mapping[str, Any] | None = None,
        **addon_settings: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.devices = resolve_devices(device)
        self.device = self.devices[0]
        self.primary_device_index = 0
        self.mode = self._check_mode(mode)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.log_bar = log_bar
        self.scheduler_step_on_batch = scheduler_step_on_batch
        self.gradient_clip = float(gradient_clip)
        self.log_every_n_steps = _positive_int("log_every_n_steps", log_every_n_steps)
        self.valid_every_n_epochs = _positive_int("valid_every_n_epochs", valid_every_n_epochs)
        self.accumulate_grad_batches = _positive_int("accumulate_grad_batches", accumulate_grad_batches)
        self.nonfinite_loss = _choice("nonfinite_loss", nonfinite_loss, ("raise", "ignore"))
        self.monitor = monitor
        self.monitor_mode = _choice("monitor_mode", monitor_mode, ("min", "max"))
        self.non_blocking = non_blocking
        self.handle_signals = handle_signals
        self.config: dict[str, Any] = dict(config or {})
        if "seed" not in self.config and (seeded := current_seed()) is not None:
            for key, value in seeded.as_config().items():  # recorded with the run by the loggers
                self.config.setdefault(key, value)
        self._check_optimizer()

        self.progress_checker = ProgressChecker()
        self._accumulators = {p: MetricAccumulator(p) for p in ("train", "valid", "test")}
        self.loss_history_train: list[float] = []
        self.loss_history_test: list[float] = []
        self.loss_buffer = math.inf if monitor_mode == "min" else -math.inf
        self.weight_buffer = self._new_weight_buffer()
        self.epoch_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []  # one dict of epoch metrics per epoch
        self.best: dict[str, Any] = {"metric": None, "value": None, "epoch": None}
        self.summary = RunSummary()
        self.stop_reason: str | None = None
        self.loader: Any = None
        self.valid_loader: Any = None
        self.batch_size: int | None = None
        self.valid_batch_size: int | None = None
        self._pending_signal: int | None = None
        self._display = ProgressDisplay(False)
        self._validating = False
        self._epoch_batches: int | None = None
        self._step_kwargs: dict[str, Any] = {}  # run()'s extra keywords, for scheduler.step
        self._target_epoch = 0
        self._started = time.perf_counter()

        routed = route_settings(self._zt_specs, addon_settings, _CORE_SETTINGS, type(self).__name__)
        self._zt_addons: tuple[AddOn, ...] = tuple(
            _construct(spec, kwargs) for spec, kwargs in zip(self._zt_specs, routed)
        )
        for addon in self._zt_addons:
            addon.trainer = self
        self._zt_bound = {
            event: tuple((self._zt_addons[i], fn.__get__(self._zt_addons[i])) for i, fn in chain)
            for event, chain in self._zt_handlers.items()
        }
        # Fast paths for the per-batch loop: skip dispatch when nothing listens, skip the
        # autocast context when no strategy overrides it.
        self._emit_hot: Callable[..., None] = self.emit if self._zt_bound else _ignore_event
        self._plain_autocast = type(self).autocast is Trainer.autocast
        cls = type(self)
        self._plain_steps = (
            cls.backward is Trainer.backward
            and cls.optimizer_step is Trainer.optimizer_step
            and cls.zero_grad is Trainer.zero_grad
        )
        self._plain_run_batch = type(self).run_batch is Trainer.run_batch
        self._train_acc = self._accumulators["train"]
        for addon in self._zt_addons:
            addon.setup(self)

    # ==================================================================================
    # What users write
    # ==================================================================================
    @abc.abstractmethod
    def train_step(self, batch: Any) -> dict[str, Any]:
        """One training step: return ``{"loss": scalar tensor with grad, ...other values}``.

        Do not call ``backward`` or ``optimizer.step``: the loop does, so that add-ons
        (mixed precision, clipping, accumulation, DDP) can hook in.
        """

    @abc.abstractmethod
    def test_step(self, batch: Any) -> dict[str, Any]:
        """One evaluation step under ``torch.no_grad()``: return ``{"loss": ..., ...}``.

        A non-scalar tensor under ``"output"`` is what :meth:`inference` returns.
        """

    # ==================================================================================
    # Composition
    # ==================================================================================
    @classmethod
    def add_on(cls, *addons: Any) -> "type[Trainer]":
        """Return a new trainer class holding ``addons``; ``cls`` itself is not changed.

        Each add-on may be an :class:`~zae_trainer.AddOn` class (configured by keyword
        arguments to the new class's constructor), a configured instance, a registered name,
        or a zae-engine ``AddOnBase`` class.

        Examples
        --------
        >>> from zae_trainer.addons import GradientClippingAddon
        >>> Clipped = Trainer.add_on(GradientClippingAddon(max_norm=1.0))
        >>> Clipped.addons
        (<class 'zae_trainer.addons.clipping.GradientClippingAddon'>,)
        """
        return build_trainer_class(cls, addons)

    @classmethod
    def from_config(cls, config: Any) -> "Trainer":
        """Build a trainer from a dict or a YAML file (see :mod:`zae_trainer.config`).

        Called on ``Trainer`` itself it builds a :class:`~zae_trainer.SupervisedTrainer`; called
        on a concrete subclass it builds that subclass.
        """
        from .config import build_trainer

        return build_trainer(config, cls)

    def get_addon(self, addon: str | type) -> AddOn:
        """This trainer's instance of an add-on, by class or by any name it answers to
        (``"state_manager"``, ``"StateManagerAddon"``)."""
        from .registry import aliases_of, normalise

        for obj in self._zt_addons:
            if isinstance(addon, type):
                if isinstance(obj, addon):
                    return obj
            elif addon == obj.name or normalise(addon) in aliases_of(type(obj)):
                return obj
        raise KeyError(f"{type(self).__name__} has no add-on {addon!r}; it has {[a.name for a in self._zt_addons]}")

    @property
    def addon_instances(self) -> tuple[AddOn, ...]:
        """This trainer's add-on objects, in declared (dispatch) order."""
        return self._zt_addons

    def emit(self, event: Event, *args: Any) -> None:
        """Call every add-on subscribed to ``event``, in declared order (reversed for end-events).

        An exception from a hook is re-raised as :class:`AddOnHookError` naming the add-on
        and the event (``SkipStep`` passes through unchanged).
        """
        for addon, hook in self._zt_bound.get(event, ()):
            try:
                hook(self, *args)
            except _PASS_THROUGH:
                raise
            except Exception as exc:
                raise AddOnHookError(addon.name, event, exc) from exc

    # ==================================================================================
    # Strategy methods (add-on mixins may override these; overrides chain with super())
    # ==================================================================================
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Wrap the model for training (DDP does); called once when ``run`` starts."""
        return model

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        """The user's module inside any wrapper (DDP, DataParallel, compiled)."""
        inner = getattr(model, "module", None)
        while isinstance(inner, nn.Module) and isinstance(
            model, (nn.parallel.DistributedDataParallel, nn.DataParallel)
        ):
            model, inner = inner, getattr(inner, "module", None)
        return getattr(model, "_orig_mod", model)

    def prepare_loader(self, loader: Any, *, train: bool) -> Any:
        """Adapt a loader before use (DDP injects a ``DistributedSampler``)."""
        return loader

    def autocast(self) -> ContextManager[Any]:
        """Context around ``train_step`` / ``test_step`` (mixed precision enters autocast)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        assert self.optimizer is not None
        self.optimizer.step()

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def no_sync(self) -> ContextManager[Any]:
        """Context for micro-batches that do not end an accumulation group (DDP skips the all-reduce)."""
        return contextlib.nullcontext()

    def all_reduce_sums(self, values: list[float]) -> list[float]:
        """Sum ``values`` over processes; identity in one process."""
        return values

    @property
    def is_main_process(self) -> bool:
        """Whether this process does the side effects (bars, logs, files): rank 0."""
        return True

    @property
    def world_size(self) -> int:
        return 1

    @property
    def raw_model(self) -> nn.Module:
        """The user's model, unwrapped: what checkpoints store."""
        return self.unwrap_model(self.model)

    # ==================================================================================
    # The loop
    # ==================================================================================
    def run(self, n_epoch: int, loader: Iterable[Any], valid_loader: Iterable[Any] | None = None, **kwargs: Any) -> None:
        """Train for ``n_epoch`` more epochs (or evaluate once per epoch in ``"test"`` mode).

        Extra keyword arguments are passed to ``scheduler.step`` (zae-engine behaviour).
        """
        self._check_run_arguments(n_epoch, loader, valid_loader)
        pc = self.progress_checker
        self.loader = self.prepare_loader(loader, train=self.mode == "train")
        self.valid_loader = self.prepare_loader(valid_loader, train=False) if valid_loader is not None else None
        self._check_batch_size()
        self.stop_reason = None
        self._target_epoch = pc.epoch + n_epoch
        self._started = time.perf_counter()
        self.summary = RunSummary(monitor=self.monitor)
        self._display = ProgressDisplay(self.log_bar and self.is_main_process)
        previous_handlers = self._install_signal_handlers()
        try:
            self.model = self.wrap_model(self.model)
            self.zero_grad()  # gradients left from before run() must not leak into step 1
            self.emit(Event.RUN_BEGIN)
            self._display.start(self._target_epoch, pc.epoch)
            if self.mode == "train":
                while pc.epoch < self._target_epoch and self.stop_reason is None:
                    self._run_one_epoch(**kwargs)
            else:  # evaluation: progress counts training only
                for _ in range(n_epoch):
                    self._run_one_epoch(**kwargs)
            self.summary.status = "stopped" if self.stop_reason else "finished"
        except (KeyboardInterrupt, TrainingTerminated):
            self.summary.status = "interrupted"
            raise
        except BaseException as exc:
            self.summary.status = "failed"
            self._emit_while_failing(Event.EXCEPTION, exc)
            raise
        finally:
            self._restore_signal_handlers(previous_handlers)
            self._finish_run()

    def _run_one_epoch(self, **kwargs: Any) -> None:
        pc = self.progress_checker
        epoch_started = time.perf_counter()
        if pc.batch_in_epoch == 0:  # a run resumed mid-epoch keeps what it had accumulated
            self.log_reset()
        self.emit(Event.EPOCH_BEGIN)
        self.run_epoch(self.loader, **kwargs)
        last = pc.epoch + 1 >= self._target_epoch
        due = (pc.epoch + 1) % self.valid_every_n_epochs == 0 or last
        if self.mode == "train" and self.valid_loader is not None and due and self.stop_reason is None:
            self.toggle("test")
            self._validating = True
            try:
                self.emit(Event.VALID_BEGIN)
                self.run_epoch(self.valid_loader, **kwargs)
                self.emit(Event.VALID_END)
            finally:
                self._validating = False
                self.toggle("train")
        self._close_epoch(time.perf_counter() - epoch_started, **kwargs)

    def run_epoch(self, loader: Iterable[Any], **kwargs: Any) -> None:
        """Run every batch of ``loader`` in the current mode (zae-engine's ``run_epoch``)."""
        pc = self.progress_checker
        training = self.mode == "train"
        phase = self._phase()
        self.model.train(training)
        total = _length(loader)
        self._display.epoch_begin(pc.epoch + 1, total, phase)
        batches: Iterable[Any] = loader
        if training:
            self._epoch_batches = total
            batches = self.skip_consumed_batches(loader, pc.batch_in_epoch)
        self._step_kwargs = kwargs
        plain = training and self._plain_run_batch and not kwargs
        tick = self._display.batch_done if self._display.interactive else None
        for batch in batches:
            if plain:
                self._train_batch(batch)
            else:
                self.run_batch(batch, **kwargs)
            if tick is not None:
                tick()
            if self._pending_signal is not None or self.stop_reason is not None:
                if self._pending_signal is not None:
                    self._interrupt()
                if training:
                    break
        if training:
            self._step_trailing_group(**kwargs)
        acc = self._accumulators[phase]
        if acc.has_pending:
            self._flush(acc)

    def skip_consumed_batches(self, loader: Iterable[Any], consumed: int) -> Iterable[Any]:
        """Iterate ``loader`` from batch ``consumed`` (resume mid-epoch); all of it when 0.

        The state manager replaces this with a sampler-aware fast-forward; this fallback
        fetches and discards the consumed batches.
        """
        if consumed == 0:
            return loader
        iterator = iter(loader)
        for _ in range(consumed):
            next(iterator, None)
        return iterator

    def run_batch(self, batch: Any, **kwargs: Any) -> None:
        """Handle one batch in the current mode (zae-engine's ``run_batch``)."""
        if self.mode == "train":
            self._train_batch(batch, **kwargs)
        elif self.mode == "test":
            self._test_batch(batch)
        else:  # mode was assigned directly, bypassing toggle()
            raise TrainerConfigError(f"unknown mode {self.mode!r}; use 'train' or 'test'")

    def _train_batch(self, batch: Any, **kwargs: Any) -> None:
        # The hot path: every line here runs once per batch, so it avoids needless context
        # managers and event lookups (see _plain_autocast / _emit_hot, set in __init__).
        pc = self.progress_checker
        emit = self._emit_hot
        emit(_TRAIN_BATCH_BEGIN)
        batch = move_to_device(batch, self.device, self.non_blocking)
        position = pc.batch_in_epoch + 1
        closes_group = position % self.accumulate_grad_batches == 0 or position == self._epoch_batches
        if closes_group:
            outputs = self._forward_backward(batch)
        else:
            with self.no_sync():
                outputs = self._forward_backward(batch)
        pc.batches += 1
        pc.batch_in_epoch = position
        size = _batch_size(batch)
        pc.samples += size
        self._train_acc.add(outputs, size, pc.step + 1)
        if closes_group:
            self._optimizer_phase(**(kwargs or self._step_kwargs))
        emit(_TRAIN_BATCH_END)
        if closes_group and pc.step % self.log_every_n_steps == 0:
            self._flush(self._train_acc)

    def _forward_backward(self, batch: Any) -> Mapping[str, Any]:
        emit = self._emit_hot
        if self._plain_autocast:
            outputs = self.train_step(batch)
        else:
            with self.autocast():
                outputs = self.train_step(batch)
        loss = _check_train_outputs(outputs, self.progress_checker.step + 1)
        emit(_BEFORE_BACKWARD)
        group = self.accumulate_grad_batches
        if group > 1:
            loss = loss / group
        if self._plain_steps:
            loss.backward()
        else:
            self.backward(loss)
        emit(_AFTER_BACKWARD)
        return outputs

    def _optimizer_phase(self, **kwargs: Any) -> None:
        pc = self.progress_checker
        emit = self._emit_hot
        try:
            emit(_BEFORE_OPTIMIZER_STEP)
            if self.gradient_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.gradient_clip)
            if self._plain_steps:
                self.optimizer.step()  # type: ignore[union-attr]
            else:
                self.optimizer_step()
            stepped = True
        except SkipStep:
            pc.skipped_steps += 1
            stepped = False
        pc.step += 1
        if stepped:
            emit(_AFTER_OPTIMIZER_STEP)
            if self.scheduler is not None and self.scheduler_step_on_batch:
                self.scheduler.step(**kwargs)
        if self._plain_steps:
            self.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        else:
            self.zero_grad()

    def _step_trailing_group(self, **kwargs: Any) -> None:
        """An epoch whose length is unknown (iterable loader) may end inside a group."""
        if self._epoch_batches is None and self.progress_checker.batch_in_epoch % self.accumulate_grad_batches:
            self._optimizer_phase(**kwargs)

    def _test_batch(self, batch: Any) -> None:
        batch = move_to_device(batch, self.device, self.non_blocking)
        with torch.no_grad(), self.autocast():
            outputs = self.test_step(batch)
        if not isinstance(outputs, Mapping):
            raise StepOutputError(
                f"test_step must return a dict such as {{'loss': loss}}, got {type(outputs).__name__}"
            )
        self.logging(outputs, _batch_size(batch))
        self.emit(Event.VALID_BATCH_END)

    def logging(self, step_dict: Mapping[str, Any], batch_size: int | None = None) -> None:
        """Record a step's outputs for the current phase (no device synchronisation).

        Means are weighted by ``batch_size`` (samples in the batch; guessed from the outputs if None).
        """
        size = _batch_size(step_dict) if batch_size is None else batch_size
        self._accumulators[self._phase()].add(step_dict, size, self.progress_checker.step)

    def record_metric(self, name: str, value: torch.Tensor | float, weight: int = 1) -> None:
        """Add a value to the current phase's metrics, as if a step had returned it.

        For add-ons that measure something per step (a gradient norm, say): ``value`` may be
        a device tensor, kept as it is until the next log point, so this never synchronises.
        It is logged as ``<phase>/<name>`` and averaged into the epoch metrics, weighted by
        ``weight`` (1: a plain mean over the recorded values).
        """
        self._accumulators[self._phase()].add_value(name, value, weight)

    def _flush(self, acc: MetricAccumulator) -> None:
        flushed = acc.flush()
        if acc.phase == "train":
            self.loss_history_train.extend(flushed.values.get("loss", ()))
            bad = flushed.first_nonfinite("loss")
            if bad is not None and self.nonfinite_loss == "raise":
                step, value = bad
                raise NonFiniteLossError(
                    f"training loss is {value} at step {step} (epoch {self.progress_checker.epoch + 1}). "
                    "Lower the learning rate, check the data for NaN/Inf, use mixed-precision loss scaling, "
                    "or add NonFiniteGuardAddon(policy='skip') to skip such steps.",
                    step,
                )
            if self.is_main_process and flushed.means:
                metrics = {f"train/{k}": v for k, v in flushed.means.items()}
                self._display.show_metrics(metrics, self.current_lr())
                self.emit(Event.LOG, metrics)
        else:
            self.loss_history_test.extend(flushed.values.get("loss", ()))

    def _close_epoch(self, seconds: float, **kwargs: Any) -> None:
        pc = self.progress_checker
        names: list[str] = []
        totals: list[float] = []
        weights: list[float] = []
        for phase, acc in self._accumulators.items():
            for key, (total, weight) in sorted(acc.sums().items()):
                names.append(f"{phase}/{key}")
                totals.append(total)
                weights.append(weight)
        reduced = self.all_reduce_sums(totals + weights)  # one collective per epoch under DDP
        metrics = {
            name: reduced[i] / reduced[len(names) + i] if reduced[len(names) + i] else math.nan
            for i, name in enumerate(names)
        }
        self.epoch_metrics = metrics
        self.history.append(dict(metrics))
        if self.mode == "train":
            self._track_best()
            self._step_scheduler_per_epoch(**kwargs)
            pc.update_epoch()
        self.emit(Event.EPOCH_END)
        self._display.epoch_end(pc.epoch, self._target_epoch, metrics, seconds)

    def _step_scheduler_per_epoch(self, **kwargs: Any) -> None:
        if self.scheduler is None or self.scheduler_step_on_batch:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            value = self.monitored_value()
            if value is None:
                raise TrainerConfigError(
                    f"ReduceLROnPlateau needs the monitored metric {self.monitor_name()!r}, which this epoch "
                    f"did not produce (it has {sorted(self.epoch_metrics)}); set monitor= to one of those"
                )
            self.scheduler.step(value)
        else:
            self.scheduler.step(**kwargs)

    def _track_best(self) -> None:
        name = self.monitor_name()
        value = self.epoch_metrics.get(name)
        if value is None or math.isnan(value):
            return
        epoch = self.progress_checker.epoch + 1
        if self.check_better(cur_epoch=epoch, cur_loss=value):
            self.best = {"metric": name, "value": value, "epoch": epoch}

    def _finish_run(self) -> None:
        pc = self.progress_checker
        s = self.summary
        s.epochs, s.steps, s.samples = pc.epoch, pc.step, pc.samples
        s.seconds = time.perf_counter() - self._started
        s.final_metrics = dict(self.epoch_metrics)
        s.monitor, s.best_value, s.best_epoch = self.best["metric"], self.best["value"], self.best["epoch"]
        s.stop_reason = self.stop_reason
        try:
            if s.status in ("failed", "interrupted"):
                self._emit_while_failing(Event.RUN_END)
            else:
                self.emit(Event.RUN_END)
        finally:
            self._display.close(s)

    # ==================================================================================
    # Control, inference, state
    # ==================================================================================
    def request_stop(self, reason: str) -> None:
        """Stop training after the current batch (or at the end of this epoch's hooks).

        The epoch in progress ends early, ``EPOCH_END`` and ``RUN_END`` still fire, and
        ``trainer.stop_reason`` / the summary record ``reason``.
        """
        if self.stop_reason is None:
            self.stop_reason = reason

    def inference(self, loader: Iterable[Any]) -> list[Any]:
        """Evaluate ``loader`` and return one item per batch, on the CPU.

        Each item is ``test_step``'s ``"output"`` value if it returns one, else its whole
        dict. Training logs, metrics, progress and the trainer's mode are left untouched.
        """
        was_training = self.model.training
        self.model.eval()
        results: list[Any] = []
        try:
            with torch.no_grad():
                for batch in loader:
                    batch = move_to_device(batch, self.device, self.non_blocking)
                    with self.autocast():
                        out = self.test_step(batch)
                    if isinstance(out, Mapping) and "output" in out:
                        out = out["output"]
                    results.append(out)
        finally:
            self.model.train(was_training)
        return [move_to_device(r, torch.device("cpu"), False) for r in results]

    def current_lr(self) -> float | None:
        """Learning rate of the first parameter group (None without an optimizer)."""
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None

    def monitor_name(self) -> str:
        """The monitored metric's name: ``monitor``, else ``valid/loss`` if validating, else ``train/loss``."""
        if self.monitor is not None:
            return self.monitor
        return "valid/loss" if "valid/loss" in self.epoch_metrics else "train/loss"

    def monitored_value(self) -> float | None:
        """The monitored metric from the last finished epoch, or None before the first."""
        return self.epoch_metrics.get(self.monitor_name())

    @property
    def log_train(self) -> dict[str, list[Any]]:
        """zae-engine: per-step values of this epoch's training outputs (flushed at log points)."""
        return _merged_log(self._accumulators["train"])

    @property
    def log_test(self) -> dict[str, list[Any]]:
        """zae-engine: per-step values of this epoch's evaluation outputs."""
        return _merged_log(self._accumulators["valid" if self.mode == "train" else self._phase()])

    @property
    def train_metrics(self) -> dict[str, float]:
        """Last epoch's training metrics, by name without the ``train/`` prefix."""
        return {k[6:]: v for k, v in self.epoch_metrics.items() if k.startswith("train/")}

    @property
    def test_metrics(self) -> dict[str, float]:
        """Last epoch's validation (or test) metrics, by name without the prefix."""
        return {
            k.split("/", 1)[1]: v for k, v in self.epoch_metrics.items() if k.startswith(("valid/", "test/"))
        }

    def state_dict(self) -> dict[str, Any]:
        """The trainer's resumable state; each add-on's state under ``addons[<name>]``."""
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "progress": self.progress_checker.state_dict(),
            "history": [dict(h) for h in self.history],
            "best": dict(self.best),
            "loss_history": {"train": list(self.loss_history_train), "test": list(self.loss_history_test)},
            "metrics": {phase: acc.state_dict() for phase, acc in self._accumulators.items()},
            "addons": {a.name: a.state_dict() for a in self._zt_addons if a.is_stateful()},
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.raw_model.load_state_dict(state["model"], strict=strict)
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.progress_checker.load_state_dict(state["progress"])
        self.history = [dict(h) for h in state.get("history", [])]
        self.epoch_metrics = dict(self.history[-1]) if self.history else {}
        self.best = dict(state.get("best", self.best))
        if self.best.get("value") is not None:
            self.loss_buffer = self.best["value"]
        losses = state.get("loss_history", {})
        self.loss_history_train = list(losses.get("train", []))
        self.loss_history_test = list(losses.get("test", []))
        for phase, acc_state in state.get("metrics", {}).items():
            self._accumulators[phase].load_state_dict(acc_state)
        saved = state.get("addons", {})
        for addon in self._zt_addons:
            if addon.name in saved:
                addon.load_state_dict(saved[addon.name])

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} mode={self.mode!r} device={self.device} step={self.progress_checker.step}>"

    # ==================================================================================
    # Checks and plumbing
    # ==================================================================================
    def _phase(self) -> str:
        if self.mode == "train":
            return "train"
        return "valid" if self._validating else "test"

    @staticmethod
    def _check_mode(mode: str) -> str:
        if mode not in _MODES:
            raise TrainerConfigError(f"mode must be 'train' or 'test', got {mode!r}")
        return mode

    def _check_optimizer(self) -> None:
        if self.optimizer is None:
            if self.mode == "train":
                raise TrainerConfigError(
                    "mode='train' needs an optimizer, e.g. optimizer=torch.optim.Adam(model.parameters()). "
                    "Use mode='test' to only evaluate."
                )
            return
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(self.optimizer).__name__}")
        model_params = {id(p) for p in self.model.parameters()}
        held = [p for group in self.optimizer.param_groups for p in group["params"]]
        if model_params and not any(id(p) in model_params for p in held):
            raise TrainerConfigError(
                "the optimizer holds none of the model's parameters, so training would change nothing. "
                "Create it from this model, e.g. torch.optim.SGD(model.parameters(), lr=0.1), after any "
                "re-creation of the model."
            )

    def _check_run_arguments(self, n_epoch: int, loader: Any, valid_loader: Any) -> None:
        if isinstance(n_epoch, bool) or not isinstance(n_epoch, int) or n_epoch < 1:
            raise TrainerConfigError(f"n_epoch must be an integer >= 1, got {n_epoch!r}")
        if len(self.devices) > 1 and self.world_size == 1:
            raise TrainerConfigError(
                f"{len(self.devices)} devices were given ({[str(d) for d in self.devices]}) but no add-on "
                "distributes the work. Add MultiGPUAddon, or pass a single device."
            )
        for name, value in (("loader", loader), ("valid_loader", valid_loader)):
            if value is None:
                if name == "loader":
                    raise TrainerConfigError("run() needs a loader, e.g. a torch.utils.data.DataLoader")
                continue
            if not hasattr(value, "__iter__"):
                raise TypeError(f"{name} must be iterable (a DataLoader), got {type(value).__name__}")
            if _length(value) == 0:
                raise TrainerConfigError(
                    f"{name} is empty (0 batches). Check the dataset's length, and drop_last=True with a "
                    "dataset smaller than the batch size."
                )

    def _emit_while_failing(self, event: Event, *args: Any) -> None:
        """Dispatch during failure: a hook's own error is attached, never hides the original."""
        for addon, hook in self._zt_bound.get(event, ()):
            try:
                hook(self, *args)
            except Exception as exc:  # the run is already failing: report, keep the first error
                import warnings

                warnings.warn(
                    f"add-on {addon.name!r} raised {type(exc).__name__} in {event} while the run was failing: "
                    f"{exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def _install_signal_handlers(self) -> dict[int, Any]:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            if self._pending_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: stop now
            self._pending_signal = signum

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)
        self._pending_signal = None

    def _interrupt(self) -> None:
        signum = self._pending_signal
        assert signum is not None
        self.emit(Event.INTERRUPT, signum)
        if signum == signal.SIGINT:
            # A plain KeyboardInterrupt: CPython then exits the conventional way (killed by
            # SIGINT, status 130); a subclass would exit with status 1.
            raise KeyboardInterrupt(f"training interrupted by SIGINT at step {self.progress_checker.step}")
        raise TrainingTerminated(signum)


_CORE_SETTINGS = (
    "model",
    "device",
    "mode",
    "optimizer",
    "scheduler",
    "log_bar",
    "scheduler_step_on_batch",
    "gradient_clip",
    "log_every_n_steps",
    "valid_every_n_epochs",
    "accumulate_grad_batches",
    "nonfinite_loss",
    "monitor",
    "monitor_mode",
    "non_blocking",
    "handle_signals",
    "config",
)


def _ignore_event(event: Event, *args: Any) -> None:
    """Stands in for ``emit`` on the hot path of a trainer without add-ons."""


def _construct(spec: AddOnSpec, kwargs: dict[str, Any]) -> AddOn:
    try:
        return spec.cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"add-on {spec.name!r} rejected its settings {sorted(kwargs)}: {exc}") from exc


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainerConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _choice(name: str, value: Any, allowed: Sequence[str]) -> Any:
    if value not in allowed:
        raise TrainerConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor (1 if it has none)."""
    if type(batch) is tuple and batch and type(batch[0]) is torch.Tensor and batch[0].dim() > 0:
        return batch[0].shape[0]  # the common (inputs, targets) case, without the search below
    stack = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            return int(item.shape[0]) if item.dim() > 0 else 1
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return 1


def _check_train_outputs(outputs: Any, step: int) -> torch.Tensor:
    """Python-side checks of a train_step result; none of them reads a tensor's value."""
    if type(outputs) is not dict and not isinstance(outputs, Mapping):
        raise StepOutputError(
            f"train_step must return a dict such as {{'loss': loss}}, got {type(outputs).__name__} at step {step}"
        )
    if "loss" not in outputs:
        raise StepOutputError(
            f"train_step's dict has no 'loss' (keys: {sorted(outputs)}) at step {step}; the loop calls "
            "backward on outputs['loss']"
        )
    loss = outputs["loss"]
    if not isinstance(loss, torch.Tensor):
        raise StepOutputError(
            f"train_step's 'loss' must be a tensor, got {type(loss).__name__} at step {step}; compute it "
            "with torch operations on the model's output"
        )
    if loss.numel() != 1:
        raise StepOutputError(
            f"train_step's 'loss' must be a scalar, got shape {tuple(loss.shape)} at step {step}; reduce it "
            "(e.g. loss.mean())"
        )
    if not loss.requires_grad:
        raise StepOutputError(
            f"train_step's 'loss' does not require grad at step {step}: it is detached from the model "
            "(computed under torch.no_grad(), from .item()/.detach(), or the model has no trainable parameters)"
        )
    return loss


def _merged_log(acc: MetricAccumulator) -> dict[str, list[Any]]:
    merged: dict[str, list[Any]] = defaultdict(list)
    for key, values in acc.history.items():
        merged[key] = values
    for key, values in acc.outputs.items():
        merged[key] = values
    return merged
