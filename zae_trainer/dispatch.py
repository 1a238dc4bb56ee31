"""Calling add-ons: the handler table bound to one trainer's add-on instances.

:func:`~zae_trainer.composition.build_trainer_class` computes, once per class, which add-on
handles which event and in what order (a :data:`HandlerTable`). When a trainer is
constructed, :class:`Dispatcher` binds that table to the trainer's add-on instances, so that
emitting an event is a loop over a ready tuple of bound methods, and an event nobody listens
to costs one dictionary miss (or, on the per-batch path, one ``is None`` test: see
:meth:`Dispatcher.caller`).

References: the dispatcher holds the add-ons, never the trainer; the trainer passes itself
to every call (``emit(trainer, event)``, ``fire(trainer)``). The trainer holds the
dispatcher, so a reference back would be a cycle, and a trainer in a cycle is not freed by
``del trainer`` but only by a later garbage collection, with its loggers still open.

Errors: an exception raised inside a hook leaves :meth:`Dispatcher.emit` with its own type
and traceback; a note naming the add-on and the event is attached (``exc.add_note``), so it
shows in the traceback and ``except NonFiniteLossError`` catches what the docs promise.
``SkipStep`` is control flow and passes through without a note.

Add-on lookup: :meth:`Dispatcher.by_type` maps every add-on class (and its base classes
below :class:`~zae_trainer.addon.AddOn`) to the instance, built once, so strategy mixins find
their add-on with one dictionary lookup instead of searching names per step.
"""

from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

from .addon import PER_STEP_OVERRIDES, AddOn
from .errors import SkipStep
from .events import Event
from .registry import aliases_of, normalise

if TYPE_CHECKING:  # pragma: no cover
    from .composition import AddOnSpec

__all__ = ["HandlerTable", "Dispatcher", "annotate", "describe_class", "active_overrides"]

#: event -> ((add-on index, unbound hook function), ...) in call order; one per trainer class.
HandlerTable = Mapping[Event, tuple[tuple[int, Callable[..., Any]], ...]]

A = TypeVar("A", bound=AddOn)
_Chain = tuple[tuple[AddOn, Callable[..., Any]], ...]


def annotate(exc: BaseException, addon: AddOn, event: Event) -> None:
    """Attach where ``exc`` came from, keeping its type (no wrapper exception).

    ``exc.add_note`` (Python 3.11+; tracebacks print the note); on 3.10 the same list is
    kept in ``exc.__notes__``, which the traceback does not show there.
    """
    note = f"raised by add-on {addon.name!r} while handling {event}"
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)
        return
    notes = getattr(exc, "__notes__", None)
    try:
        if isinstance(notes, list):
            notes.append(note)
        else:
            exc.__notes__ = [note]  # type: ignore[attr-defined]
    except AttributeError:  # an exception type with __slots__: nothing can be attached
        pass


class Dispatcher:
    """One trainer's add-ons, and the bound hooks of each event in call order.

    Parameters
    ----------
    addons : sequence of AddOn
        The trainer's add-on instances in declared (dispatch) order.
    table : HandlerTable
        The class's handler table (indices into ``addons``).
    """

    __slots__ = ("addons", "_chains", "_by_type")

    def __init__(self, addons: Sequence[AddOn], table: HandlerTable) -> None:
        self.addons = tuple(addons)
        self._chains: dict[Event, _Chain] = {
            event: tuple((self.addons[i], fn.__get__(self.addons[i])) for i, fn in chain)
            for event, chain in table.items()
        }
        self._by_type: dict[type, AddOn] = {}
        for addon in self.addons:
            for klass in type(addon).__mro__:
                if klass is AddOn:
                    break
                self._by_type.setdefault(klass, addon)

    def drop_idle(self) -> None:
        """Leave out the hooks each add-on says it does not need (:meth:`AddOn.idle_events`).

        Called once, after every add-on's ``setup``: configuration decides what is idle.
        """
        idle = {id(addon): addon.idle_events() for addon in self.addons}
        self._chains = {
            event: kept
            for event, chain in self._chains.items()
            if (kept := tuple((a, h) for a, h in chain if event not in idle[id(a)]))
        }

    # -- calling --------------------------------------------------------------------------
    def emit(self, trainer: Any, event: Event, *args: Any) -> None:
        """Call every hook subscribed to ``event`` with ``trainer``; a hook's exception propagates
        unchanged."""
        for addon, hook in self._chains.get(event, ()):
            try:
                hook(trainer, *args)
            except SkipStep:
                raise
            except BaseException as exc:
                annotate(exc, addon, event)
                raise

    def caller(self, event: Event) -> Callable[[Any], None] | None:
        """A ready function ``fire(trainer)`` that fires ``event``, or None if nobody listens.

        The per-batch events use this: the loop tests ``is None`` instead of entering
        :meth:`emit`, so an event without subscribers costs nothing measurable per step. The
        trainer keeps these functions, so they take it as an argument instead of holding it.
        """
        chain = self._chains.get(event)
        if not chain:
            return None

        def fire(trainer: Any) -> None:
            for addon, hook in chain:
                try:
                    hook(trainer)
                except SkipStep:
                    raise
                except BaseException as exc:
                    annotate(exc, addon, event)
                    raise

        fire.__qualname__ = f"fire_{event.name.lower()}"
        return fire

    def emit_while_failing(self, trainer: Any, event: Event, *args: Any) -> None:
        """Dispatch while the run is already failing: a hook's own error becomes a warning,
        so it never hides the original one; every subscriber still runs."""
        for addon, hook in self._chains.get(event, ()):
            try:
                hook(trainer, *args)
            except Exception as exc:  # the run is already failing: report, keep the first error
                warnings.warn(
                    f"add-on {addon.name!r} raised {type(exc).__name__} in {event} while the run was failing: "
                    f"{exc}",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def subscribers(self, event: Event) -> tuple[AddOn, ...]:
        """The add-ons that handle ``event``, in call order."""
        return tuple(addon for addon, _ in self._chains.get(event, ()))

    # -- finding add-ons ------------------------------------------------------------------
    def by_type(self, cls: type[A]) -> A | None:
        """The add-on that is an instance of ``cls`` (one dictionary lookup), or None."""
        return self._by_type.get(cls)  # type: ignore[return-value]

    def by_type_table(self) -> Mapping[type, AddOn]:
        """The class -> add-on table behind :meth:`by_type`, for callers that look up per step."""
        return self._by_type

    def find(self, addon: str | type, owner: str) -> AddOn:
        """The add-on of a class, or answering to a name (``"state_manager"``); KeyError lists them."""
        for obj in self.addons:
            if isinstance(addon, type):
                if isinstance(obj, addon):
                    return obj
            elif addon == obj.name or normalise(addon) in aliases_of(type(obj)):
                return obj
        raise KeyError(f"{owner} has no add-on {addon!r}; it has {[a.name for a in self.addons]}")


def active_overrides(cls: type, addons: Sequence[AddOn]) -> dict[str, Callable[..., Any]]:
    """Per-step strategy methods whose outermost override is idle, mapped to the function to call instead.

    For each of :data:`~zae_trainer.addon.PER_STEP_OVERRIDES`, the definitions along
    ``cls.__mro__`` are the call chain (each override calls ``super()``). Leading overrides
    whose add-on declares them idle (:meth:`AddOn.idle_overrides`) are skipped; the first one
    left is what the loop should call. Methods whose chain needs no skipping are left out, so
    the result is empty when every strategy has work to do.
    """
    owners = {type(a).trainer_mixin: a for a in addons if type(a).trainer_mixin is not None}
    idle = {klass: addon.idle_overrides() for klass, addon in owners.items()}
    if not any(idle.values()):
        return {}
    chosen: dict[str, Callable[..., Any]] = {}
    for name in sorted(PER_STEP_OVERRIDES):
        skipped = False
        for klass in cls.__mro__:
            function = vars(klass).get(name)
            if function is None:
                continue
            if name in idle.get(klass, ()):
                skipped = True
                continue
            if skipped and inspect.isfunction(function):
                chosen[name] = function
            break
    return chosen


def describe_class(cls: type, specs: Sequence["AddOnSpec"], table: HandlerTable) -> str:
    """The resolved composition of a trainer class, as text: add-ons, strategies, hook order.

    What :meth:`Trainer.describe` prints; declared ordering (``order``, ``runs_after``,
    ``runs_before``, reversed end-events) is only useful if it can be read back.
    """
    lines = [f"{getattr(cls, '__qualname__', cls.__name__)}"]
    if not specs:
        lines.append("  add-ons: (none)")
    else:
        lines.append("  add-ons, in declared order:")
        for spec in specs:
            extra = []
            if spec.cls.order:
                extra.append(f"order={spec.cls.order}")
            if spec.cls.runs_after:
                extra.append(f"runs_after={list(spec.cls.runs_after)}")
            if spec.cls.runs_before:
                extra.append(f"runs_before={list(spec.cls.runs_before)}")
            suffix = f"  ({', '.join(extra)})" if extra else ""
            lines.append(f"    {spec.name}: {spec.cls.__module__}.{spec.cls.__qualname__}{suffix}")
    strategies: dict[str, list[str]] = {}
    for klass in cls.__mro__:
        owner = next((s.name for s in specs if s.cls.trainer_mixin is klass), None)
        if owner is None:
            continue
        for name in vars(klass):
            if not name.startswith("__"):
                strategies.setdefault(name, []).append(owner)
    if strategies:
        lines.append("  strategy methods (outermost first, then the core):")
        for method in sorted(strategies):
            lines.append(f"    {method}: {' -> '.join([*strategies[method], 'Trainer'])}")
    lines.append("  hooks per event (call order):")
    for event in Event:
        chain = table.get(event, ())
        names = " -> ".join(specs[i].name for i, _ in chain) if chain else "-"
        flag = "  [reverse of declared order]" if chain and event.is_reversed else ""
        lines.append(f"    {event.name:<22} {names}{flag}")
    return "\n".join(lines)
