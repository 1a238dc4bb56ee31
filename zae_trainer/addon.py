"""The add-on protocol: what an add-on declares, and how it is configured.

An add-on is a small object that the trainer creates alongside itself. It

* **declares its settings** as keyword parameters of ``__init__``. The built trainer's
  constructor routes each keyword to every add-on that declares it (so ``web_logger=``
  reaches both the W&B and the Neptune add-on);
* **subscribes to events** by defining ``on_<event>`` methods (see :mod:`zae_trainer.events`);
  a name that starts with ``on_`` but is no event fails when the class is built;
* **declares its order** with ``order`` (a band: lower runs earlier on begin-events, later on
  end-events) and ``runs_after`` / ``runs_before`` (names of other add-ons, honoured when
  those are present); argument order to ``add_on`` never matters;
* **keeps its state** in its own attributes, exposed through ``state_dict`` /
  ``load_state_dict`` so checkpoints carry it;
* **exports** methods to the trainer by listing their names in ``exports``
  (``trainer.save_state()`` calls the state manager's ``save_state``);
* may be a **strategy**: ``trainer_mixin`` names a class whose methods override a small set
  of core methods (:data:`STRATEGY_METHODS`), each chaining with ``super()``.

Examples
--------
>>> class PrintEpoch(AddOn):
...     def __init__(self, *, prefix: str = "epoch") -> None:
...         self.prefix = prefix
...     def on_epoch_end(self, trainer) -> None:
...         print(self.prefix, trainer.progress_checker.epoch)
>>> # Trainer.add_on(PrintEpoch)(..., prefix="E")  or  Trainer.add_on(PrintEpoch(prefix="E"))
"""

from __future__ import annotations

import abc
import inspect
import weakref
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from .events import Event
    from .trainer import Trainer

__all__ = ["AddOn", "AddOnBase", "STRATEGY_METHODS", "PER_STEP_OVERRIDES", "REQUIRED"]

T = TypeVar("T", bound=type)

#: Core methods a strategy add-on's ``trainer_mixin`` may override. Each override must call
#: ``super()`` so that strategies stack (mixed precision inside DDP, say).
STRATEGY_METHODS: Final[frozenset[str]] = frozenset(
    {
        "run",  # e.g. spawn worker processes, then gather results
        "wrap_model",  # e.g. DistributedDataParallel
        "unwrap_model",
        "prepare_loader",  # e.g. inject a DistributedSampler
        "skip_consumed_batches",  # e.g. sampler-aware fast-forward when resuming mid-epoch
        "autocast",  # context manager around train_step / test_step
        "backward",
        "optimizer_step",
        "zero_grad",
        "no_sync",  # context for non-final micro-batches of gradient accumulation
        "all_reduce_sums",  # cross-process reduction of metric sums
        "agree_to_stop",  # ranks stop for a signal at the same batch boundary
        "is_main_process",
        "world_size",
    }
)

#: Strategy methods the loop calls on every step; an add-on may declare its overrides of
#: these idle for a run (:meth:`AddOn.idle_overrides`).
PER_STEP_OVERRIDES: Final[frozenset[str]] = frozenset({"autocast", "backward", "optimizer_step", "zero_grad", "no_sync"})

REQUIRED: Final = inspect.Parameter.empty


class AddOn:
    """Base class of zae_trainer add-ons. See the module docstring for the protocol.

    Class attributes
    ----------------
    name : str
        The add-on's name in messages, ordering declarations and the registry
        (defaults to the class name).
    order : int
        Ordering band; lower runs earlier on begin-type events. Default 0.
    runs_after, runs_before : tuple of str
        Names of add-ons this one must run after / before, when they are present.
    conflicts_with : tuple of str
        Names of add-ons that cannot be combined with this one.
    exports : tuple of str
        Method names that appear on the trainer and call this add-on's method.
    trainer_mixin : type or None
        A class overriding methods from :data:`STRATEGY_METHODS`.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 0
    runs_after: ClassVar[tuple[str, ...]] = ()
    runs_before: ClassVar[tuple[str, ...]] = ()
    conflicts_with: ClassVar[tuple[str, ...]] = ()
    exports: ClassVar[tuple[str, ...]] = ()
    trainer_mixin: ClassVar[type | None] = None

    #: Settings given when this instance was configured (``AddOn(x=1)``); filled by ``__new__``.
    _given_settings: dict[str, Any]
    #: A weak reference to the trainer this add-on serves (see :attr:`trainer`).
    _trainer_ref: "weakref.ReferenceType[Trainer] | None" = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__ or not cls.__dict__["name"]:
            cls.name = cls.__name__
        params = inspect.signature(cls.__init__).parameters
        positional = [
            p.name
            for p in list(params.values())[1:]
            if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)
        ]
        if positional:
            raise TypeError(
                f"add-on {cls.__name__}: settings must be keyword parameters of __init__ "
                f"(found positional-only/var-positional {positional}). To fix, declare them after '*'."
            )

    def __new__(cls, *args: Any, **kwargs: Any) -> "AddOn":
        self = super().__new__(cls)
        bound = inspect.signature(cls.__init__).bind_partial(self, *args, **kwargs)
        given = dict(bound.arguments)
        given.pop(next(iter(given)))  # self
        var_kw = [p.name for p in cls.settings_parameters().values() if p.kind is p.VAR_KEYWORD]
        for name in var_kw:
            given.update(given.pop(name, {}))
        self._given_settings = given
        return self

    def __init__(self) -> None:
        """An add-on without settings needs no ``__init__`` of its own."""

    # -- declarations ---------------------------------------------------------------
    @classmethod
    def settings_parameters(cls) -> dict[str, inspect.Parameter]:
        """The keyword settings ``__init__`` declares, by name (``self`` excluded)."""
        params = dict(inspect.signature(cls.__init__).parameters)
        params.pop(next(iter(params)))
        return params

    @classmethod
    def settings(cls) -> dict[str, Any]:
        """Declared settings and their defaults (:data:`REQUIRED` for required ones)."""
        return {
            n: p.default
            for n, p in cls.settings_parameters().items()
            if p.kind is not p.VAR_KEYWORD
        }

    @classmethod
    def accepts_any_setting(cls) -> bool:
        """True when ``__init__`` takes ``**kwargs``; such an add-on receives no routed extras."""
        return any(p.kind is p.VAR_KEYWORD for p in cls.settings_parameters().values())

    # -- the trainer -----------------------------------------------------------------
    @property
    def trainer(self) -> "Trainer":
        """The trainer this add-on serves; set by the trainer before ``setup`` and any hook.

        Held as a weak reference: the trainer holds its add-ons, so a strong reference back
        would be a cycle, and ``del trainer`` would then leave the trainer, its add-ons and
        their open files and runs to a later garbage collection instead of freeing them at
        once. Hooks receive the trainer as their argument; use that in per-step code (this
        property dereferences the weak reference on each access).

        Raises
        ------
        RuntimeError
            Before the add-on is attached to a trainer, or after that trainer was freed.
        """
        ref = self._trainer_ref
        trainer = ref() if ref is not None else None
        if trainer is None:
            state = "was never attached to a trainer" if ref is None else "outlived its trainer, which was freed"
            raise RuntimeError(
                f"add-on {self.name!r} {state}, so there is no trainer to use. To fix, call this through a "
                "live trainer (keep a reference to the trainer while you use its add-ons), or pass the trainer "
                "to what needs it."
            )
        return trainer

    @trainer.setter
    def trainer(self, trainer: "Trainer") -> None:
        self._trainer_ref = weakref.ref(trainer)

    # -- lifecycle ------------------------------------------------------------------
    def setup(self, trainer: "Trainer") -> None:
        """Called once when the trainer is constructed, after every add-on exists.

        Validate settings against the trainer here (fail at construction, not at step
        10,000). ``self.trainer`` is already set.
        """

    def idle_events(self) -> "frozenset[Event]":
        """Events this instance, as configured, does not need to hear; asked once after ``setup``.

        Dispatch leaves these hooks out of this trainer's call chains, so a hook that would
        only return at once costs nothing per step (``PrecisionMixerAddon("fp32")`` has
        nothing to unscale before the optimizer step). Default: none.
        """
        return frozenset()

    def idle_overrides(self) -> frozenset[str]:
        """Per-step strategy methods of ``trainer_mixin`` this instance, as configured, only
        passes on to ``super()``; asked at the start of each ``run()``.

        For that run the loop calls past these overrides (see :data:`PER_STEP_OVERRIDES`), so
        a strategy with nothing to do costs no call per step: ``PrecisionMixerAddon("fp32")``
        neither autocasts nor scales the loss. An override is skipped only where no
        other add-on's override of the same method, outside this one, still calls
        ``super()`` into it. Default: none.
        """
        return frozenset()

    def state_dict(self) -> dict[str, Any]:
        """This add-on's resumable state: tensors and plain values only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(
                f"add-on {self.name!r} keeps no state but a checkpoint holds {sorted(state)} for it"
            )

    @classmethod
    def is_stateful(cls) -> bool:
        """Whether this add-on overrides ``state_dict`` (checkpoints then carry its state)."""
        return cls.state_dict is not AddOn.state_dict

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._given_settings.items())
        return f"{type(self).__name__}({args})"


class AddOnBase(abc.ABC):
    """zae-engine-style add-on: a class whose ``apply`` returns a subclass of the trainer.

    Kept so add-ons written for ``zae_engine.trainer`` work unchanged. New add-ons should
    subclass :class:`AddOn`, which composes in any order and whose hooks cannot hide
    each other.

    Examples
    --------
    >>> class Greeting(AddOnBase):
    ...     @classmethod
    ...     def apply(cls, base_cls):
    ...         class WithGreeting(base_cls):
    ...             def greet(self):
    ...                 return "hi"
    ...         return WithGreeting
    """

    addon_case: ClassVar[int | None] = None

    @classmethod
    @abc.abstractmethod
    def apply(cls, base_cls: T) -> T:
        """Return a subclass of ``base_cls`` with this add-on's behaviour."""
        raise NotImplementedError("Add-on must implement the apply method.")
