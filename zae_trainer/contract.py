"""The contract between the core :class:`~zae_trainer.Trainer` and what is built on it.

Extension points for subclasses (compat)
=========================================

A subclass of ``Trainer`` (the zae-engine layer in :mod:`zae_trainer.compat`, or a user's own
trainer) changes behaviour by overriding these methods; the core loop calls them and has no
branch for any particular subclass:

``record_step(outputs, batch_size)``
    Called by the loop once per batch **in every phase** (train, valid, test) with the dict
    ``train_step``/``test_step`` returned and the number of samples in the batch. The core
    keeps a reference to each scalar on the device (no synchronisation). Read
    :attr:`TrainerView.phase` to know which phase it is. An override that calls
    ``super().record_step(outputs, batch_size)`` keeps the core's metrics; zae-engine's
    per-batch ``logging(step_dict)`` maps onto it.
``phase_end_metrics(phase) -> Mapping[str, float]``
    Called once at the end of each phase's batches (after the phase's last batch, before
    ``VALID_END`` / ``EPOCH_END``). Whatever it returns is added to the epoch metrics as
    ``<phase>/<name>`` (numbers or one-element tensors, read once). Default: nothing.
    zae-engine's ``metric_on_epoch_end()`` maps onto it.
``phase`` (read-only property)
    ``"train"``, ``"valid"`` or ``"test"``: which batches the loop is running now. It never
    changes the run kind.
``run_kind`` (read-only property, fixed at construction by ``mode=``)
    ``"train"``: ``run()`` trains, validating on ``valid_loader`` when given.
    ``"test"``: ``run()`` only evaluates the loader it is given (phase ``"test"``, no
    optimizer needed, no progress counted). A zae-engine ``mode="test"`` run is this.
``train_step`` / ``test_step``
    What users write. ``train_step`` returns ``{"loss": scalar with grad, ...}``.
Strategy methods (``wrap_model``, ``unwrap_model``, ``prepare_loader``, ``skip_consumed_batches``,
``autocast``, ``backward``, ``optimizer_step``, ``zero_grad``, ``no_sync``, ``all_reduce_sums``,
``agree_to_stop``, ``is_main_process``, ``world_size``, ``run``)
    What strategy add-ons (DDP, mixed precision) override through ``trainer_mixin``, always
    chaining with ``super()``; the set is :data:`~zae_trainer.addon.STRATEGY_METHODS`.
Constructor keywords
    The built class's metaclass takes every keyword an add-on declares *before* the user's
    ``__init__`` runs, so a subclass with a fixed signature
    (``def __init__(self, model, optimizer=None, scheduler=None, mode="train")``) still gets
    ``web_logger=`` / ``save_path=`` routed to its add-ons. A keyword the subclass's own
    ``__init__`` names explicitly is passed to it as well.

What the core deliberately does not have (the compat layer adds them): ``toggle``, a flipping
``mode``, ``check_better`` / ``weight_buffer``, ``loss_history_*``, ``log_reset``, ``logging()``,
``print_log``, ``gradient_clip=`` (use ``GradientClippingAddon``), ``batch_size`` attributes.

What add-ons may read and change
================================

:class:`TrainerView` lists what an add-on's hooks may read on the trainer they receive; hooks
are typed with it. Add-ons change core state only through the named setters at its end
(:meth:`TrainerView.request_stop`, :meth:`TrainerView.record_metric`,
:meth:`TrainerView.set_nonfinite_loss`) or by raising :class:`~zae_trainer.errors.SkipStep`;
they keep their own state in their own attributes, never in the trainer's ``__dict__``.
Strategy add-ons that place the run on devices (DDP, Accelerate) may, in ``setup`` or
``wrap_model``, assign ``device``, ``devices``, ``primary_device_index``, ``model`` and
``optimizer``: those are plain attributes for that reason.

References run one way, from the trainer to its add-ons. An add-on reaches its trainer through
the ``trainer`` argument every hook receives; ``AddOn.trainer`` (for exported methods such as
``save_state()``) is a weak reference behind a property, dereferenced at each access, so per-step
code uses the argument. Nothing an add-on stores may hold the trainer strongly (a bound method
of it, a closure over it): that would be a cycle, and ``del trainer`` would no longer free the
trainer, its model and its loggers' runs at once (``tests/test_lifecycle_refs.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Mapping, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .addon import AddOn
    from .display import RunSummary
    from .events import Event
    from .progress import ProgressChecker

__all__ = ["TrainerView", "Phase", "RunKind"]

Phase = Literal["train", "valid", "test"]
RunKind = Literal["train", "test"]
A = TypeVar("A", bound="AddOn")


@runtime_checkable
class TrainerView(Protocol):
    """What an add-on's hook may read on the trainer, and the setters it may call.

    Every :class:`~zae_trainer.Trainer` satisfies it (``isinstance(trainer, TrainerView)``).
    """

    # -- the run's parts --------------------------------------------------------------
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    #: With several optimizers, the name of the one stepping now (inside its
    #: BEFORE/AFTER_OPTIMIZER_STEP, where ``optimizer`` is that one); None otherwise.
    stepping: str | None
    device: torch.device
    devices: list[torch.device]
    primary_device_index: int
    loader: Any
    valid_loader: Any
    config: dict[str, Any]

    @property
    def raw_model(self) -> nn.Module:
        """The user's model inside any wrapper: what checkpoints store."""

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer by name (one: ``{"optimizer": optimizer}``); see :mod:`zae_trainer.optimizers`."""

    # -- settings (read-only for add-ons) -----------------------------------------------
    log_every_n_steps: int
    valid_every_n_epochs: int
    accumulate_grad_batches: int
    scheduler_step_on_batch: bool
    monitor: str | None
    monitor_mode: Literal["min", "max"]
    non_blocking: bool

    @property
    def nonfinite_loss(self) -> Literal["raise", "ignore"]:
        """The core's own NaN/Inf loss check at log points (see :meth:`set_nonfinite_loss`)."""

    @property
    def run_kind(self) -> RunKind:
        """``"train"`` or ``"test"``, fixed at construction."""

    @property
    def phase(self) -> Phase:
        """Which batches the loop runs now: ``"train"``, ``"valid"`` or ``"test"``."""

    # -- where the run is -----------------------------------------------------------------
    progress_checker: ProgressChecker
    epoch_metrics: dict[str, float]
    history: list[dict[str, float]]
    best: dict[str, Any]
    summary: RunSummary
    stop_reason: str | None

    @property
    def world_size(self) -> int: ...

    @property
    def is_main_process(self) -> bool: ...

    @property
    def addon_instances(self) -> tuple[AddOn, ...]: ...

    def monitor_name(self) -> str: ...

    def monitored_value(self) -> float | None: ...

    def current_lr(self) -> float | None: ...

    def get_addon(self, addon: str | type) -> AddOn: ...

    def addon_of(self, cls: type[A]) -> A | None: ...

    def emit(self, event: Event, *args: Any) -> None: ...

    def all_reduce_sums(self, values: list[float]) -> list[float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None: ...

    # -- the setters: everything an add-on may change -------------------------------------
    def request_stop(self, reason: str) -> None:
        """Stop training after the current batch; ``EPOCH_END`` and ``RUN_END`` still fire."""

    def record_metric(self, name: str, value: torch.Tensor | float, weight: int = 1) -> None:
        """Add a per-step value to the current phase's metrics, without synchronising."""

    def set_nonfinite_loss(self, policy: Literal["raise", "ignore"]) -> None:
        """Hand the NaN/Inf loss decision to an add-on (the non-finite guard's skip policies)."""
