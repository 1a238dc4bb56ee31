"""The core training loop.

Subclass :class:`Trainer`, write ``train_step`` and ``test_step``, and call ``run``. Everything
optional — checkpoints, loggers, DDP, clipping, mixed precision — is an add-on composed with
``Trainer.add_on(...)``; the loop only emits :class:`~zae_trainer.events.Event` s (in the
order the pseudocode in :mod:`zae_trainer.events` shows).

The loop never converts a tensor to a Python number per step: step outputs are kept on the
device and read in one transfer per metric at log points and at epoch end.

How to read this module: ``run`` → ``_run_epoch`` → ``_run_phase`` → ``_train_batch`` /
``_eval_batch``. Dispatch lives in :mod:`zae_trainer.dispatch`, the checks of user input in
:mod:`zae_trainer.checks`, signal handling in :mod:`zae_trainer.signals`, and what add-ons
and subclasses may rely on in :mod:`zae_trainer.contract`.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import math
import os
import signal
import sys
import time
from typing import IO, Any, Callable, ClassVar, ContextManager, Iterable, Literal, Mapping, TypeVar

import torch
from torch import nn

from .addon import AddOn
from .checks import (
    batch_size,
    check_eval_outputs,
    check_monitor,
    check_optimizer,
    check_run_arguments,
    check_run_kind,
    check_train_outputs,
    choice,
    is_better,
    loader_length,
    positive_int,
)
from .composition import AddOnSpec, build_trainer_class, register_pickling, route_settings
from .contract import Phase, RunKind
from .dispatch import Dispatcher, HandlerTable, active_overrides, describe_class
from .display import ProgressDisplay, RunSummary
from .errors import NonFiniteLossError, SkipStep, TrainerConfigError, TrainingTerminated
from .events import Event
from .grad_nodes import hold_grad_accumulators
from .metrics import MetricAccumulator
from .optimizers import SchedulerGroup, check_several_losses, optimizer_dict, parameters_of, scheduler_or_group
from .progress import ProgressChecker
from .seed import current_seed
from .signals import StopSignals
from .transfer import DeviceLike, move_to_device, resolve_devices

__all__ = ["Trainer", "TrainerMeta"]

A = TypeVar("A", bound=AddOn)

#: Returned by the core ``autocast``: the loop recognises it and calls the step directly,
#: so a run without mixed precision enters no context manager per step.
_NO_CONTEXT: ContextManager[Any] = contextlib.nullcontext()


class TrainerMeta(abc.ABCMeta):
    """Metaclass of trainers: routes add-on keywords, and pickles built classes by recipe.

    Calling a trainer class takes every keyword an add-on of that class declares *before* the
    class's own ``__init__`` runs, so a user subclass with a fixed signature never sees
    ``save_path=`` or ``web_logger=``; the core routes them to the add-ons when
    ``Trainer.__init__`` runs. A keyword the class's ``__init__`` names explicitly reaches it
    too.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        declared: frozenset[str] = cls.__dict__.get("_zt_addon_keywords") or _addon_keywords(cls)
        call = (args, dict(kwargs))  # as given: what spawned DDP workers are rebuilt from
        captured: dict[str, Any] = {}
        if declared and kwargs:
            explicit = _named_parameters(cls.__init__)  # type: ignore[misc]
            for key in [k for k in kwargs if k in declared]:
                captured[key] = kwargs[key] if key in explicit else kwargs.pop(key)
        new: Any = cls.__new__
        obj = new(cls)
        obj._zt_captured_settings = captured
        obj._zt_constructor_call = call
        if isinstance(obj, cls):
            obj.__init__(*args, **kwargs)
        return obj


register_pickling(TrainerMeta)


class Trainer(metaclass=TrainerMeta):
    """Minimal training loop; subclass it and implement ``train_step`` and ``test_step``.

    Parameters
    ----------
    model : nn.Module
        The model; moved to ``device``.
    device : str, torch.device, list or None
        ``None`` / ``"auto"``: the best available accelerator, else CPU. A list of devices
        needs a distributing add-on (``MultiGPUAddon``).
    mode : {"train", "test"}
        The run kind, fixed for the trainer's life (read it as ``trainer.run_kind``):
        ``"train"`` trains and validates; ``"test"`` makes ``run`` evaluate only.
    optimizer : torch.optim.Optimizer, mapping of str to Optimizer, or None
        Must hold (some of) the model's parameters. Required when training. A dict of
        several (``{"generator": ..., "discriminator": ...}``) makes ``train_step`` return
        one loss per optimizer (see :mod:`zae_trainer.optimizers`).
    scheduler : LR scheduler, mapping of str to scheduler, or None
        Stepped per epoch, or per optimizer step with ``scheduler_step_on_batch=True``.
        ``ReduceLROnPlateau`` is stepped with the monitored metric. A dict of several
        (an LR and a momentum schedule, one per optimizer) steps them all together.
    log_bar : bool
        Progress bar on an interactive stderr, one line per epoch otherwise.
    scheduler_step_on_batch : bool
        Step the scheduler after every optimizer step instead of every epoch.
    log_every_n_steps : int
        How often (in optimizer steps) step metrics are read from the device, logged and
        shown. The only per-step cost of logging is keeping a reference.
    valid_every_n_epochs : int
        Validate every N epochs (and always after the last).
    valid_every_n_steps : int or None
        Validate after every N-th optimizer step (counted over the run, so mid-epoch too)
        instead of at epoch ends; the run's last epoch still ends with a validation unless
        its last step was one. Each validation is logged at its step (``LOG`` with
        ``valid/<name>``); an epoch's ``valid/*`` metrics are those of its latest validation,
        and an epoch without one has none. Costs nothing per step when None.
    accumulate_grad_batches : int
        Optimizer step every N batches, loss scaled by 1/N.
    nonfinite_loss : {"raise", "ignore"}
        What to do with a NaN/Inf training loss, detected at the next log point (checked
        before any checkpoint is written). Use ``NonFiniteGuardAddon`` to skip such steps.
    monitor : str or None
        Metric that defines "best" for checkpoints, early stopping and plateau schedulers.
        Default: ``"valid/loss"`` when validating, else ``"train/loss"``. A name this run
        does not produce fails at the first epoch end that could have produced it, listing
        the metrics that exist.
    monitor_mode : {"min", "max"}
        Whether lower or higher ``monitor`` is better. A value must be strictly better than
        the best so far, so on ties the earliest epoch stays best.
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
    _zt_handlers: ClassVar[HandlerTable] = {}
    _zt_captured_settings: dict[str, Any]
    _zt_constructor_call: tuple[tuple[Any, ...], dict[str, Any]]
    #: names bound on the instance for the current run() (see _bind_steps)
    _bound_for_run: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module,
        device: DeviceLike = None,
        mode: RunKind = "train",
        optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer] | None = None,
        scheduler: Any = None,
        *,
        log_bar: bool = True,
        scheduler_step_on_batch: bool = False,
        log_every_n_steps: int = 50,
        valid_every_n_epochs: int = 1,
        valid_every_n_steps: int | None = None,
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
        self._run_kind: RunKind = check_run_kind(mode)
        self._phase: Phase = "train" if mode == "train" else "test"
        self.model = model.to(self.device)
        # Several optimizers: {name: optimizer}, else None (the single-optimizer loop).
        self._optimizers = optimizer_dict(optimizer)
        if isinstance(optimizer, Mapping):
            optimizer = next(iter(optimizer.values()))
        self.optimizer: torch.optim.Optimizer | None = optimizer
        self.scheduler = scheduler_or_group(scheduler)
        #: The name of the optimizer stepping now (several optimizers only), else None.
        self.stepping: str | None = None
        self.log_bar = log_bar
        self.scheduler_step_on_batch = scheduler_step_on_batch
        self.log_every_n_steps = positive_int("log_every_n_steps", log_every_n_steps)
        self.valid_every_n_epochs = positive_int("valid_every_n_epochs", valid_every_n_epochs)
        self.valid_every_n_steps = (
            None if valid_every_n_steps is None else positive_int("valid_every_n_steps", valid_every_n_steps)
        )
        self.accumulate_grad_batches = positive_int("accumulate_grad_batches", accumulate_grad_batches)
        self._nonfinite_loss: Literal["raise", "ignore"] = choice(
            "nonfinite_loss", nonfinite_loss, ("raise", "ignore")
        )
        self.monitor = monitor
        self.monitor_mode: Literal["min", "max"] = choice("monitor_mode", monitor_mode, ("min", "max"))
        self.non_blocking = non_blocking
        self.handle_signals = handle_signals
        self.config: dict[str, Any] = dict(config or {})
        if "seed" not in self.config and (seeded := current_seed()) is not None:
            for key, value in seeded.as_config().items():  # recorded with the run by the loggers
                self.config.setdefault(key, value)
        checked: list[torch.optim.Optimizer | None] = [*self._optimizers.values()] if self._optimizers else [optimizer]
        for each in checked:
            check_optimizer(self.model, each, mode)
        if self._optimizers is not None:  # run() binds the several-optimizer steps (see _bind_steps)
            self._losses_pending: set[str] = set()
            self._others: dict[str, list[torch.Tensor]] = {
                name: [p for other, opt in self._optimizers.items() if other != name for p in parameters_of(opt)]
                for name in self._optimizers
            }

        self.progress_checker = ProgressChecker()
        self._accumulators = {p: MetricAccumulator(p) for p in ("train", "valid", "test")}
        self._acc = self._accumulators[self._phase]  # the current phase's accumulator
        self._extras: dict[str, dict[str, float]] = {}  # phase_end_metrics() of this epoch
        self.epoch_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []  # one dict of epoch metrics per epoch
        self.best: dict[str, Any] = {"metric": None, "value": None, "epoch": None}
        self.summary = RunSummary()
        #: What the last ``test()`` evaluated: its ``weights`` (a path as ``str``); None: the model as it was.
        self.test_weights: str | None = None
        self.stop_reason: str | None = None
        self.loader: Any = None
        self.valid_loader: Any = None
        self._signals = StopSignals(False)
        self._display = ProgressDisplay(False)
        self._epoch_batches: int | None = None
        self._grad_nodes: list[Any] = []  # held during a training phase (see grad_nodes)
        self._step_kwargs: dict[str, Any] = {}  # run()'s extra keywords, for scheduler.step
        self._target_epoch = 0
        self._target_step: int | None = None  # run(max_steps=...): stop once progress_checker.step reaches it
        self._halt = False  # leave the training batches now (a stop request or the step limit)
        self._validated_at: int | None = None  # optimizer step of the latest step-driven validation
        self._monitor_checked = monitor is None
        self._started = time.perf_counter()
        self._seconds_before = 0.0  # training seconds of this run before this run() call (in checkpoints)
        self._clock_running = False

        given = {**self.__dict__.pop("_zt_captured_settings", {}), **addon_settings}
        self._constructor_call: tuple[tuple[Any, ...], dict[str, Any]] | None = self.__dict__.pop(
            "_zt_constructor_call", None
        )
        routed = route_settings(self._zt_specs, given, _CORE_SETTINGS, type(self).__name__)
        addons = tuple(_construct(spec, kwargs) for spec, kwargs in zip(self._zt_specs, routed))
        for addon in addons:
            addon.trainer = self
        self._dispatch = Dispatcher(addons, self._zt_handlers)  # holds no reference back to self
        self._addon_by_type = self._dispatch.by_type_table()  # addon_of: one dict lookup per call
        for addon in addons:
            addon.setup(self)
        self._dispatch.drop_idle()
        # The per-batch events, bound once: None when nobody listens (see Dispatcher.caller);
        # each is called with the trainer (fire(self)): kept here, it may not hold self.
        caller = self._dispatch.caller
        self._fire_batch_begin = caller(Event.TRAIN_BATCH_BEGIN)
        self._fire_before_backward = caller(Event.BEFORE_BACKWARD)
        self._fire_after_backward = caller(Event.AFTER_BACKWARD)
        self._fire_before_step = caller(Event.BEFORE_OPTIMIZER_STEP)
        self._fire_after_step = caller(Event.AFTER_OPTIMIZER_STEP)
        self._fire_addon_batch_end = caller(Event.TRAIN_BATCH_END)
        self._fire_batch_end = self._fire_addon_batch_end  # run() adds the step watch when it needs one
        self._fire_valid_batch_end = caller(Event.VALID_BATCH_END)
        # Only when a strategy overrides agree_to_stop: one process reads the signal flag directly.
        self._ranks_agree = type(self).agree_to_stop is not Trainer.agree_to_stop

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
    # Extension points for subclasses (see zae_trainer.contract)
    # ==================================================================================
    def record_step(self, outputs: Mapping[str, Any], batch_size: int) -> None:
        """Record one batch's outputs for the current phase; called by the loop in every phase.

        Scalars are kept as device references and averaged, weighted by ``batch_size``, at
        log points and epoch end; nothing is read from the device here. Override it to see
        every batch's outputs (call ``super()`` to keep the metrics).
        """
        self._acc.add(outputs, batch_size, self.progress_checker.step + 1)

    def phase_end_metrics(self, phase: Phase) -> Mapping[str, Any]:
        """Extra metrics for ``phase``, asked once when its batches are done; default none.

        What it returns is added to the epoch metrics as ``<phase>/<name>`` (a name the steps
        also returned is replaced). Values may be numbers or one-element tensors.
        """
        return {}

    @property
    def phase(self) -> Phase:
        """``"train"``, ``"valid"`` or ``"test"``: which batches the loop is running."""
        return self._phase

    @property
    def constructor_call(self) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The positional and keyword arguments this trainer's class was called with, as given
        (None for a trainer made without calling its class).

        A distributing add-on that spawns worker processes rebuilds the trainer from them
        (``type(trainer)(*args, **kwargs)``), whatever ``__init__`` signature a subclass has.
        """
        return self._constructor_call

    @property
    def run_kind(self) -> RunKind:
        """``"train"`` (train, then validate) or ``"test"`` (evaluate only); fixed by ``mode=``."""
        return self._run_kind

    @property
    def nonfinite_loss(self) -> Literal["raise", "ignore"]:
        """The core's NaN/Inf training-loss policy, checked at log points."""
        return self._nonfinite_loss

    def set_nonfinite_loss(self, policy: Literal["raise", "ignore"]) -> None:
        """Change the core's NaN/Inf loss policy (an add-on that decides itself sets ``"ignore"``)."""
        self._nonfinite_loss = choice("nonfinite_loss", policy, ("raise", "ignore"))

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
    def describe(cls, file: IO[str] | None = None) -> str:
        """Print the resolved composition to ``file`` (default stdout) and return it: the
        add-ons in dispatch order, which strategy wraps which core method, and the hook call
        order of every event (declared ordering is only useful if it can be read back).

        Examples
        --------
        >>> import io
        >>> from zae_trainer.addons import GradientClippingAddon, PrecisionMixerAddon
        >>> built = Trainer.add_on(GradientClippingAddon(max_norm=1.0), PrecisionMixerAddon)
        >>> text = built.describe(io.StringIO())
        >>> "BEFORE_OPTIMIZER_STEP  precision_mixer -> gradient_clipping" in text
        True
        """
        text = describe_class(cls, cls._zt_specs, cls._zt_handlers)
        print(text, file=file if file is not None else sys.stdout)
        return text

    def get_addon(self, addon: str | type) -> AddOn:
        """This trainer's instance of an add-on, by class or by any name it answers to
        (``"state_manager"``, ``"StateManagerAddon"``). Not for per-step use: see :meth:`addon_of`."""
        return self._dispatch.find(addon, type(self).__name__)

    def addon_of(self, cls: type[A]) -> A | None:
        """This trainer's instance of add-on class ``cls`` (or a subclass), or None.

        One dictionary lookup, built at construction: what strategy mixins use per step.
        """
        return self._addon_by_type.get(cls)  # type: ignore[return-value]

    @property
    def addon_instances(self) -> tuple[AddOn, ...]:
        """This trainer's add-on objects, in declared (dispatch) order."""
        return self._dispatch.addons

    def emit(self, event: Event, *args: Any) -> None:
        """Call every add-on subscribed to ``event``, in declared order (reversed for end-events).

        An exception from a hook propagates with its own type; a note names the add-on and
        the event (see :mod:`zae_trainer.dispatch`).
        """
        self._dispatch.emit(self, event, *args)

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

    def autocast(self) -> ContextManager[Any]:
        """Context around ``train_step`` / ``test_step`` (mixed precision enters autocast)."""
        return _NO_CONTEXT

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
        return _NO_CONTEXT

    def agree_to_stop(self, pending: int | None, *, phase_end: bool = False) -> int | None:
        """The signal the loop stops for at this batch boundary, or None to go on.

        ``pending`` is the signal this process received (None if none). The loop calls this
        after every batch, and with ``phase_end=True`` once a phase's batches are done, but
        only when a strategy overrides it; alone, a process stops at once (this default).
        Processes that train together must stop at the same boundary, or those still running
        block in their next collective: ``MultiGPUAddon`` makes the ranks agree.
        """
        return pending

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
    def run(
        self,
        n_epoch: int | None,
        loader: Iterable[Any],
        valid_loader: Iterable[Any] | None = None,
        *,
        max_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Train for ``n_epoch`` more epochs (or, with ``mode="test"``, evaluate ``n_epoch`` times).

        Parameters
        ----------
        n_epoch : int or None
            Epochs to train, counted from where the trainer is when ``run`` starts (a
            checkpoint the state manager resumes at ``RUN_BEGIN`` counts toward it). ``None``
            only with ``max_steps``: as many epochs as the steps need.
        loader, valid_loader
            Training and (optional) validation batches.
        max_steps : int or None
            Stop after this many more optimizer steps, mid-epoch if need be (with
            ``n_epoch`` too, whichever comes first). The epoch in progress then ends early,
            as with ``request_stop``: the final validation runs, ``EPOCH_END`` fires with the
            metrics of the batches run, the epoch counts as done (a later ``run`` starts a
            new epoch) and the summary's status is ``"finished"``. Costs nothing per step
            when None.
        **kwargs
            Passed to ``scheduler.step``.
        """
        if max_steps is not None:
            max_steps = positive_int("max_steps", max_steps)
            if self._run_kind != "train":
                raise TrainerConfigError(
                    "max_steps counts optimizer steps, and a mode='test' trainer takes none. To fix, drop "
                    "max_steps, or evaluate with trainer.test(loader)."
                )
        elif n_epoch is None:
            raise TrainerConfigError("run() needs n_epoch, max_steps or both, e.g. run(10, loader) or "
                                     "run(None, loader, max_steps=1000)")
        check_run_arguments(1 if n_epoch is None else n_epoch, loader, valid_loader, self.devices, self.world_size)
        if self._optimizers is not None and (self.world_size > 1 or _has_addon(self, "accelerate")):
            raise TrainerConfigError(
                f"several optimizers ({sorted(self._optimizers)}) have not been run with a multi-process strategy "
                "(DDP, FSDP, Accelerate), so this is refused. To fix, train in one process, or combine the losses "
                "into one optimizer's loss."
            )
        pc = self.progress_checker
        training = self._run_kind == "train"
        self.loader = self.prepare_loader(loader, train=training)
        self.valid_loader = self.prepare_loader(valid_loader, train=False) if valid_loader is not None else None
        self.stop_reason = None
        self._halt = False
        self._step_kwargs = kwargs
        self._target_step = None if max_steps is None else pc.step + max_steps
        self._target_epoch = pc.epoch + (n_epoch if n_epoch is not None else self._epochs_for(max_steps or 0))
        self._validated_at = None
        self._fire_batch_end = self._batch_end_caller()
        self._started = time.perf_counter()
        self._clock_running = True
        self.summary = RunSummary(monitor=self.monitor)
        self._display = ProgressDisplay(self.log_bar and self.is_main_process)
        with StopSignals(self.handle_signals) as self._signals:
            try:
                self._bind_steps()
                self.model = self.wrap_model(self.model)
                self.zero_grad()  # gradients left from before run() must not leak into step 1
                for optimizer in (self._optimizers or {}).values():
                    optimizer.zero_grad(set_to_none=True)
                self.emit(Event.RUN_BEGIN)
                self._display.start(self._target_epoch, pc.epoch)
                if training:
                    while pc.epoch < self._target_epoch and not self._halt and not self._steps_done():
                        self._run_epoch()
                else:  # evaluation: progress counts training only
                    for _ in range(n_epoch):
                        self._run_epoch()
                self.summary.status = "stopped" if self.stop_reason else "finished"
            except (KeyboardInterrupt, TrainingTerminated):
                self.summary.status = "interrupted"
                raise
            except BaseException as exc:
                self.summary.status = "failed"
                self._dispatch.emit_while_failing(self, Event.EXCEPTION, exc)
                raise
            finally:
                self._fire_batch_end = self._fire_addon_batch_end
                self._unbind_steps()  # no bound method of self left on self (a reference cycle)
                self._finish_run()

    def _run_epoch(self) -> None:
        pc = self.progress_checker
        epoch_started = time.perf_counter()
        if pc.batch_in_epoch == 0:  # a run resumed mid-epoch keeps what it had accumulated
            for acc in self._accumulators.values():
                acc.reset()
            self._extras = {}
        self.emit(Event.EPOCH_BEGIN)
        if self._run_kind == "test":
            self._run_phase("test", self.loader)
        else:
            self._run_phase("train", self.loader)
            if self._validation_due():
                self._validate()
        self._close_epoch(time.perf_counter() - epoch_started)

    def _validation_due(self) -> bool:
        if self.valid_loader is None or self.stop_reason is not None:
            return False
        pc = self.progress_checker
        last = pc.epoch + 1 >= self._target_epoch or self._steps_done()
        if self.valid_every_n_steps is not None:  # validated on steps; the run still ends validated
            return last and self._validated_at != pc.step
        return last or (pc.epoch + 1) % self.valid_every_n_epochs == 0

    def _validate(self) -> None:
        """One validation pass: ``VALID_BEGIN``, the valid batches, ``VALID_END`` (phase "valid" throughout)."""
        self._enter_phase("valid")
        try:
            self.emit(Event.VALID_BEGIN)
            self._run_phase("valid", self.valid_loader)
            self.emit(Event.VALID_END)
        finally:
            self._enter_phase("train")

    # -- run(max_steps=...) and valid_every_n_steps: bound only when asked for ------------
    def _steps_done(self) -> bool:
        return self._target_step is not None and self.progress_checker.step >= self._target_step

    def _epochs_for(self, steps: int) -> int:
        """Epochs ``steps`` optimizer steps take (for the progress display); a bound when unknown."""
        length = loader_length(self.loader)
        if length is None:
            return sys.maxsize
        per_epoch = max(1, math.ceil(length / self.accumulate_grad_batches))
        return max(1, math.ceil((steps + self.progress_checker.batch_in_epoch // self.accumulate_grad_batches) / per_epoch))

    def _batch_end_caller(self) -> Callable[[Any], None] | None:
        """What the loop calls at ``TRAIN_BATCH_END``: the add-ons' hooks, plus the step watch
        when this run has a step limit or step-driven validation (otherwise nothing is added)."""
        addons = self._fire_addon_batch_end
        watch_valid = self.valid_every_n_steps is not None and self.valid_loader is not None
        if self._target_step is None and not watch_valid:
            return addons
        pc = self.progress_checker
        every = self.valid_every_n_steps or 0
        seen = pc.step

        def batch_end(trainer: Trainer) -> None:
            nonlocal seen
            if addons is not None:
                addons(trainer)
            if pc.step == seen:  # no optimizer step closed in this batch
                return
            seen = pc.step
            if watch_valid and pc.step % every == 0 and trainer.stop_reason is None:
                trainer._validate_on_step()
            if trainer._steps_done():
                trainer._halt = True

        return batch_end

    def _bind_steps(self) -> None:
        """Put this run's step functions in place: with several optimizers, their
        forward/backward and optimizer phase instead of the single-optimizer ones (which then
        pay nothing for them); and, where a strategy add-on declares its per-step override
        idle (:meth:`AddOn.idle_overrides`, e.g. precision fp32), the next one in its place.

        Bound for one ``run()`` only and dropped by :meth:`_unbind_steps`: a bound method of
        the trainer kept on the trainer is a reference cycle, which would keep a deleted
        trainer (and its loggers) alive until the next garbage collection.
        """
        bound = {
            name: function.__get__(self, type(self))
            for name, function in active_overrides(type(self), self._dispatch.addons).items()
            if name not in self.__dict__  # an instance's own assignment wins
        }
        if self._optimizers is not None:
            bound["_forward_backward"] = self._forward_backward_several
            bound["_optimizer_phase"] = self._optimizer_phase_several
        self.__dict__.update(bound)
        self._bound_for_run = tuple(bound)

    def _unbind_steps(self) -> None:
        for name in self._bound_for_run:
            self.__dict__.pop(name, None)
        self._bound_for_run = ()

    def _validate_on_step(self) -> None:
        """A step-driven validation: its metrics replace this epoch's ``valid/*`` and are logged now."""
        self._accumulators["valid"].reset()
        self._extras.pop("valid", None)
        self._validate()
        self._validated_at = self.progress_checker.step
        metrics = self._reduce(("valid",))
        if self.is_main_process and metrics:
            self.emit(Event.LOG, metrics)

    def _enter_phase(self, phase: Phase) -> None:
        self._phase = phase
        self._acc = self._accumulators[phase]
        self.model.train(phase == "train")

    def _run_phase(self, phase: Phase, loader: Iterable[Any]) -> None:
        """Every batch of ``loader`` in ``phase``; stops early at a signal or a stop request."""
        pc = self.progress_checker
        self._enter_phase(phase)
        training = phase == "train"
        total = loader_length(loader)
        self._display.epoch_begin(pc.epoch + 1, total, phase)
        if training:
            self._epoch_batches = total
            batches = self.skip_consumed_batches(loader, pc.batch_in_epoch)
            handle = self._train_batch
            self._grad_nodes = hold_grad_accumulators(self.model)  # reused by every step (see grad_nodes)
        else:
            batches, handle = loader, self._eval_batch
        tick = self._display.batch_done if self._display.interactive else None
        signals = self._signals
        agree = self.agree_to_stop if self._ranks_agree else None  # processes agree on stopping (DDP)
        for batch in batches:
            handle(batch)
            if tick is not None:
                tick()
            if agree is None:
                if signals.pending is not None:
                    self._interrupt(signals.pending)
            elif (agreed := agree(signals.pending)) is not None:
                self._interrupt(agreed)
            if training and self._halt:
                break
        if agree is not None and (agreed := agree(signals.pending, phase_end=True)) is not None:
            self._interrupt(agreed)
        if training:
            self._step_trailing_group()
            self._grad_nodes = []
        acc = self._acc
        if acc.has_pending:
            self._flush(acc)
        extras = {**acc.compute_metrics(), **self.phase_end_metrics(phase)}  # torchmetrics, then the user
        if extras:
            self._extras[phase] = {str(k): float(v) for k, v in extras.items()}

    def _train_batch(self, batch: Any) -> None:
        # The hot path: every line runs once per batch. Events nobody listens to are None.
        pc = self.progress_checker
        if self._fire_batch_begin is not None:
            self._fire_batch_begin(self)
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
        size = batch_size(batch)
        pc.samples += size
        self.record_step(outputs, size)
        if closes_group:
            self._optimizer_phase()
        if self._fire_batch_end is not None:
            self._fire_batch_end(self)
        if closes_group and pc.step % self.log_every_n_steps == 0:
            self._flush(self._acc)

    def _forward_backward(self, batch: Any) -> Mapping[str, Any]:
        context = self.autocast()
        if context is _NO_CONTEXT:  # no mixed precision: no context manager per step
            outputs = self.train_step(batch)
        else:
            with context:
                outputs = self.train_step(batch)
        loss = check_train_outputs(outputs, self.progress_checker.step + 1)
        if self._fire_before_backward is not None:
            self._fire_before_backward(self)
        if self.accumulate_grad_batches > 1:
            loss = loss / self.accumulate_grad_batches
        self.backward(loss)
        if self._fire_after_backward is not None:
            self._fire_after_backward(self)
        return outputs

    def _optimizer_phase(self) -> None:
        pc = self.progress_checker
        try:
            if self._fire_before_step is not None:
                self._fire_before_step(self)
            self.optimizer_step()
            stepped = True
        except SkipStep:
            pc.skipped_steps += 1
            stepped = False
        pc.step += 1
        if stepped:
            if self._fire_after_step is not None:
                self._fire_after_step(self)
            if self.scheduler is not None and self.scheduler_step_on_batch:
                self.scheduler.step(**self._step_kwargs)
        self.zero_grad()

    def _step_trailing_group(self) -> None:
        """An epoch whose length is unknown (iterable loader) may end inside a group."""
        if self._epoch_batches is None and self.progress_checker.batch_in_epoch % self.accumulate_grad_batches:
            self._optimizer_phase()

    # -- several optimizers (see zae_trainer.optimizers): bound in place of the two above ----
    def _forward_backward_several(self, batch: Any) -> Mapping[str, Any]:
        context = self.autocast()
        if context is _NO_CONTEXT:
            outputs = self.train_step(batch)
        else:
            with context:
                outputs = self.train_step(batch)
        assert self._optimizers is not None
        losses = check_several_losses(outputs, self._optimizers, self.progress_checker.step + 1)
        if self._fire_before_backward is not None:
            self._fire_before_backward(self)
        for name, loss in losses.items():
            if self.accumulate_grad_batches > 1:
                loss = loss / self.accumulate_grad_batches
            # This loss's gradients go to its own optimizer's parameters only: the others'
            # gradients are set aside during its backward and put back after it.
            others = self._others[name]
            kept = [p.grad for p in others]
            for p in others:
                p.grad = None
            self.backward(loss)
            for p, grad in zip(others, kept):
                p.grad = grad
            self._losses_pending.add(name)
        if self._fire_after_backward is not None:
            self._fire_after_backward(self)
        recorded = {k: v for k, v in outputs.items() if k != "loss"}
        detached = [loss.detach() for loss in losses.values()]
        # "loss" is their sum: the core's NaN/Inf check and the default monitor read it
        recorded["loss"] = detached[0] if len(detached) == 1 else _sum_of_scalars(detached)
        recorded.update({f"loss/{name}": value for name, value in zip(losses, detached)})
        return recorded

    def _optimizer_phase_several(self) -> None:
        pc = self.progress_checker
        assert self._optimizers is not None
        first = self.optimizer
        stepped: list[tuple[str, torch.optim.Optimizer]] = []
        try:
            for name, optimizer in self._optimizers.items():
                if name not in self._losses_pending:
                    continue
                self.optimizer, self.stepping = optimizer, name
                try:
                    if self._fire_before_step is not None:
                        self._fire_before_step(self)
                    self.optimizer_step()
                    stepped.append((name, optimizer))
                except SkipStep:
                    pc.skipped_steps += 1  # one per skipped optimizer update
            pc.step += 1
            for name, optimizer in stepped:
                self.optimizer, self.stepping = optimizer, name
                if self._fire_after_step is not None:
                    self._fire_after_step(self)
        finally:
            self.optimizer, self.stepping = first, None
            self._losses_pending.clear()
        if stepped and self.scheduler is not None and self.scheduler_step_on_batch:
            self.scheduler.step(**self._step_kwargs)
        for optimizer in self._optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.zero_grad()

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The trainer's optimizers by name: the dict given as ``optimizer=``, or
        ``{"optimizer": optimizer}`` with one (empty without any)."""
        if self._optimizers is not None:
            return dict(self._optimizers)
        return {} if self.optimizer is None else {"optimizer": self.optimizer}

    def _eval_batch(self, batch: Any) -> None:
        batch = move_to_device(batch, self.device, self.non_blocking)
        with torch.no_grad():
            context = self.autocast()
            if context is _NO_CONTEXT:
                outputs = self.test_step(batch)
            else:
                with context:
                    outputs = self.test_step(batch)
        self.record_step(check_eval_outputs(outputs), batch_size(batch))
        if self._fire_valid_batch_end is not None:
            self._fire_valid_batch_end(self)

    def record_metric(self, name: str, value: torch.Tensor | float, weight: int = 1) -> None:
        """Add a value to the current phase's metrics, as if a step had returned it.

        For add-ons that measure something per step (a gradient norm, say): ``value`` may be
        a device tensor, kept as it is until the next log point, so this never synchronises.
        It is logged as ``<phase>/<name>`` and averaged into the epoch metrics, weighted by
        ``weight`` (1: a plain mean over the recorded values).
        """
        self._acc.add_value(name, value, weight)

    def _flush(self, acc: MetricAccumulator) -> None:
        flushed = acc.flush()
        if acc.phase != "train":
            return
        bad = flushed.first_nonfinite("loss")
        if bad is not None and self._nonfinite_loss == "raise":
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

    def _close_epoch(self, seconds: float) -> None:
        pc = self.progress_checker
        metrics = self._reduce(tuple(self._accumulators))
        self.epoch_metrics = metrics
        self.history.append(dict(metrics))
        if self._run_kind == "train":
            if not self._monitor_checked and self.monitor is not None:
                self._monitor_checked = check_monitor(self.monitor, metrics, self.valid_loader is not None)
            self._track_best()
            self._step_scheduler_per_epoch()
            pc.update_epoch()
        self.emit(Event.EPOCH_END)
        self._display.epoch_end(pc.epoch, self._target_epoch, metrics, seconds)

    def _reduce(self, phases: tuple[str, ...]) -> dict[str, float]:
        """The means of ``phases``' metrics (global under DDP: one collective), as ``<phase>/<name>``."""
        names: list[str] = []
        totals: list[float] = []
        weights: list[float] = []
        for phase in phases:
            acc = self._accumulators[phase]
            extras = self._extras.get(phase, {})
            for key, (total, weight) in sorted(acc.sums().items()):
                if key not in extras:
                    names.append(f"{phase}/{key}")
                    totals.append(total)
                    weights.append(weight)
            for key, value in sorted(extras.items()):  # a mean over processes under DDP
                names.append(f"{phase}/{key}")
                totals.append(value)
                weights.append(1.0)
        reduced = self.all_reduce_sums(totals + weights)  # one collective per epoch under DDP
        n = len(names)
        return {name: reduced[i] / reduced[n + i] if reduced[n + i] else math.nan for i, name in enumerate(names)}

    def _step_scheduler_per_epoch(self) -> None:
        if self.scheduler is None or self.scheduler_step_on_batch:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) or (
            isinstance(self.scheduler, SchedulerGroup) and self.scheduler.needs_metric
        ):
            value = self.monitored_value()
            if value is None:
                raise TrainerConfigError(
                    f"ReduceLROnPlateau needs the monitored metric {self.monitor_name()!r}, which this epoch "
                    f"did not produce (it has {sorted(self.epoch_metrics)}); set monitor= to one of those"
                )
            self.scheduler.step(value)
        else:
            self.scheduler.step(**self._step_kwargs)

    def _track_best(self) -> None:
        name = self.monitor_name()
        value = self.epoch_metrics.get(name)
        if value is None or math.isnan(value):
            return
        if is_better(value, self.best["value"] if self.best["metric"] == name else None, self.monitor_mode):
            self.best = {"metric": name, "value": value, "epoch": self.progress_checker.epoch + 1}

    def _finish_run(self) -> None:
        pc = self.progress_checker
        s = self.summary
        s.epochs, s.steps, s.samples = pc.epoch, pc.step, pc.samples
        s.seconds = time.perf_counter() - self._started
        s.run_seconds = self._seconds_before + s.seconds
        self._seconds_before, self._clock_running = s.run_seconds, False  # a later run() continues the clock
        s.final_metrics = dict(self.epoch_metrics)
        s.monitor, s.best_value, s.best_epoch = self.best["metric"], self.best["value"], self.best["epoch"]
        s.stop_reason = self.stop_reason
        try:
            if s.status in ("failed", "interrupted"):
                self._dispatch.emit_while_failing(self, Event.RUN_END)
            else:
                self.emit(Event.RUN_END)
        finally:
            self._display.close(s)

    def _interrupt(self, signum: int) -> None:
        self.emit(Event.INTERRUPT, signum)
        if signum == signal.SIGINT:
            # A plain KeyboardInterrupt: CPython then exits the conventional way (killed by
            # SIGINT, status 130); a subclass would exit with status 1.
            raise KeyboardInterrupt(f"training interrupted by SIGINT at step {self.progress_checker.step}")
        raise TrainingTerminated(signum)

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
        self._halt = True

    def test(self, loader: Iterable[Any], weights: str | os.PathLike[str] | None = None) -> dict[str, float]:
        """Evaluate ``loader`` with ``test_step`` and return the ``test/*`` metrics.

        Nothing of the training run changes: not ``history``, ``epoch_metrics``, ``best``,
        progress, the run's ``summary`` (nor a logger's ``summary.json``), the optimizer, nor
        the model's weights once it returns. The metrics go to every add-on through
        ``Event.TEST_END(metrics)``; loggers record them as test results.

        Parameters
        ----------
        loader : iterable
            The test batches.
        weights : {None, "last", "best"}, "best:<metric>" or a path
            Which weights to evaluate. ``None`` or ``"last"``: the model as it is now (after
            training, the last epoch's weights). ``"best"``, ``"best:<metric>"`` or a file:
            loaded through the state manager (``StateManagerAddon``), which must be present.
            Unlike Lightning's ``trainer.test(ckpt_path="best")``, which leaves the best
            weights loaded, the weights the model had are put back afterwards, so training can
            go on and ``test(weights="last")`` after ``test(weights="best")`` means what it says;
            use ``get_addon("state_manager").apply_weights("best")`` to keep the best loaded.

        Returns
        -------
        dict of str to float
            ``test/<name>`` means over the batches, weighted by batch size (global under DDP).

        Examples
        --------
        >>> metrics = trainer.test(test_loader, weights="best")  # doctest: +SKIP
        >>> metrics["test/loss"]  # doctest: +SKIP
        """
        if loader is None or not hasattr(loader, "__iter__"):
            raise TypeError(f"test() needs an iterable of batches (a DataLoader), got {type(loader).__name__}")
        restore = self._load_test_weights(weights)
        self.test_weights = None if weights is None else os.fspath(weights)  # loggers record it with the metrics
        previous = self._phase, self._acc, self._accumulators["test"], self._extras.pop("test", None)
        was_training = self.model.training
        self._accumulators["test"] = MetricAccumulator("test")
        try:
            self._run_phase("test", self.prepare_loader(loader, train=False))
            metrics = self._reduce(("test",))
        finally:
            self._phase, self._acc, self._accumulators["test"] = previous[0], previous[1], previous[2]
            self._extras.pop("test", None)
            if previous[3] is not None:
                self._extras["test"] = previous[3]
            self.model.train(was_training)
            if restore is not None:
                self.raw_model.load_state_dict(restore)
        self.emit(Event.TEST_END, dict(metrics))
        return metrics

    def _load_test_weights(self, weights: str | os.PathLike[str] | None) -> dict[str, torch.Tensor] | None:
        """Load ``weights`` for :meth:`test`; return a copy of the weights to put back (None: none loaded)."""
        if weights is None or weights == "last":
            return None
        manager = next((a for a in self.addon_instances if a.name == "state_manager"), None)
        if manager is None:
            raise TrainerConfigError(
                f"test(weights={weights!r}) loads checkpointed weights through the state manager, and this trainer "
                f"({type(self).__name__}) has none. To fix, add StateManagerAddon(save_path=...) to the trainer, "
                "load the weights yourself and call test(loader) (weights=None evaluates the model as it is)."
            )
        restore = {k: v.detach().clone() for k, v in self.raw_model.state_dict().items()}
        manager.apply_weights(weights)  # type: ignore[attr-defined]
        return restore

    def inference(self, loader: Iterable[Any]) -> list[Any]:
        """Evaluate ``loader`` and return one item per batch, on the CPU.

        Each item is ``test_step``'s ``"output"`` value if it returns one, else its whole
        dict. Metrics, progress and the phase are left untouched.
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

    @property
    def run_seconds(self) -> float:
        """Training seconds of the whole run so far, across resumes (checkpoints carry them) and
        ``run()`` calls: what the summary prints and the loggers' run clocks agree with."""
        live = time.perf_counter() - self._started if self._clock_running else 0.0
        return self._seconds_before + live

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

    def state_dict(self) -> dict[str, Any]:
        """The trainer's resumable state; each add-on's state under ``addons[<name>]``."""
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            **self._other_optimizer_states(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "progress": self.progress_checker.state_dict(),
            "history": [dict(h) for h in self.history],
            "best": dict(self.best),
            "seconds": self.run_seconds,
            "metrics": {phase: kept for phase, acc in self._accumulators.items() if (kept := acc.state_dict())},
            "addons": {a.name: a.state_dict() for a in self.addon_instances if a.is_stateful()},
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned (keys older versions wrote, such as
        ``loss_history``, are ignored)."""
        self.raw_model.load_state_dict(state["model"], strict=strict)
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self._optimizers is not None:
            self._load_other_optimizers(state.get("optimizers"))
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.progress_checker.load_state_dict(state["progress"])
        self.history = [dict(h) for h in state.get("history", [])]
        self.epoch_metrics = dict(self.history[-1]) if self.history else {}
        self.best = dict(state.get("best") or self.best)
        if "seconds" in state:  # the run clock goes on from the checkpoint's total
            elapsed = time.perf_counter() - self._started if self._clock_running else 0.0
            self._seconds_before = float(state["seconds"]) - elapsed
        saved_metrics = state.get("metrics", {})
        for phase, acc in self._accumulators.items():  # a phase left out had nothing recorded
            acc.load_state_dict(saved_metrics.get(phase, {}))
        saved = state.get("addons", {})
        for addon in self.addon_instances:
            if addon.name in saved:
                addon.load_state_dict(saved[addon.name])

    def _other_optimizer_states(self) -> dict[str, Any]:
        """``{"optimizers": {name: state}}`` for every optimizer after the first (several only)."""
        if self._optimizers is None:
            return {}
        names = list(self._optimizers)[1:]
        return {"optimizers": {name: self._optimizers[name].state_dict() for name in names}}

    def _load_other_optimizers(self, saved: Any) -> None:
        assert self._optimizers is not None
        expected = list(self._optimizers)[1:]
        missing = [name for name in expected if not isinstance(saved, Mapping) or name not in saved]
        if missing:
            found = sorted(saved) if isinstance(saved, Mapping) else None
            raise KeyError(
                f"the checkpoint holds no state for optimizer(s) {missing} (it has {found}). To fix, resume with the "
                "optimizer names of the run that wrote it, or load only the weights (apply_weights)."
            )
        for name in expected:
            self._optimizers[name].load_state_dict(saved[name])

    def __repr__(self) -> str:
        return (
            f"<{type(self).__qualname__} run_kind={self._run_kind!r} phase={self._phase!r} device={self.device} "
            f"step={self.progress_checker.step}>"
        )


_CORE_SETTINGS = (
    "model",
    "device",
    "mode",
    "optimizer",
    "scheduler",
    "log_bar",
    "scheduler_step_on_batch",
    "log_every_n_steps",
    "valid_every_n_epochs",
    "valid_every_n_steps",
    "accumulate_grad_batches",
    "nonfinite_loss",
    "monitor",
    "monitor_mode",
    "non_blocking",
    "handle_signals",
    "config",
)


def _sum_of_scalars(values: list[torch.Tensor]) -> torch.Tensor:
    """The sum of one-element tensors, as a 0-dim tensor. Stacked as they are (a reshape per
    value is a view, ~13,000 instructions, per optimizer per step); reshaped only when their
    shapes differ, ``()`` beside ``(1,)``."""
    try:
        return torch.stack(values).sum()
    except RuntimeError:
        return torch.stack([value.reshape(()) for value in values]).sum()


def _addon_keywords(cls: type) -> frozenset[str]:
    """Keywords the add-ons of ``cls`` declare (not the core's), cached on the class."""
    specs: tuple[AddOnSpec, ...] = getattr(cls, "_zt_specs", ())
    names = frozenset(n for s in specs for n in s.cls.settings()) - frozenset(_CORE_SETTINGS)
    type.__setattr__(cls, "_zt_addon_keywords", names)
    return names


def _has_addon(trainer: Trainer, name: str) -> bool:
    return any(a.name == name for a in trainer.addon_instances)


def _named_parameters(init: Callable[..., Any]) -> frozenset[str]:
    """Parameter names ``init`` declares explicitly (not through ``**kwargs``)."""
    try:
        params = inspect.signature(init).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def _construct(spec: AddOnSpec, kwargs: dict[str, Any]) -> AddOn:
    try:
        return spec.cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"add-on {spec.name!r} rejected its settings {sorted(kwargs)}: {exc}") from exc
