"""``Trainer.add_on``: build a new trainer class from a base class and add-ons.

Everything that can be wrong with a combination of add-ons is found here, when the class
is built: misspelt hooks, hook signatures, duplicates, declared conflicts, ordering cycles,
strategy overrides outside :data:`~zae_trainer.addon.STRATEGY_METHODS`, two strategies
overriding one method without declaring which wraps which, clashing exports.

The built class records how it was made (``_zt_recipe``) so it can be pickled by
rebuilding it from its base and add-ons — what spawned DDP workers need.
"""

from __future__ import annotations

import copyreg
import difflib
import heapq
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from .addon import REQUIRED, STRATEGY_METHODS, AddOn, AddOnBase
from .errors import AddOnDefinitionError
from .events import EVENT_ARGUMENTS, HOOK_NAMES, HOOK_PREFIX, Event
from .dispatch import HandlerTable
from .registry import aliases_of, normalise, resolve

__all__ = ["AddOnSpec", "build_trainer_class", "route_settings", "HandlerTable"]


@dataclass(frozen=True)
class AddOnSpec:
    """An add-on class plus the settings it was configured with (if given as an instance)."""

    cls: type[AddOn]
    preset: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cls.name

    def __reduce__(self) -> tuple[Any, ...]:
        return (AddOnSpec, (self.cls, dict(self.preset)))


def _to_spec(addon: Any) -> AddOnSpec | type[AddOnBase]:
    """Accept an add-on class, a configured instance, a registered name, or a legacy class."""
    if isinstance(addon, str):
        addon = resolve(addon)
    if isinstance(addon, AddOn):
        return AddOnSpec(type(addon), dict(addon._given_settings))
    if isinstance(addon, type) and issubclass(addon, AddOn):
        return AddOnSpec(addon)
    if isinstance(addon, type) and issubclass(addon, AddOnBase):
        return addon
    raise AddOnDefinitionError(
        f"add_on() got {addon!r} ({type(addon).__name__}); expected an AddOn subclass, a configured "
        "AddOn instance, a registered add-on name, or a zae-engine AddOnBase subclass"
    )


# -- validation ------------------------------------------------------------------------


def _own_hooks(cls: type[AddOn]) -> dict[str, Callable[..., Any]]:
    """Hook functions an add-on class defines anywhere below :class:`AddOn` in its MRO."""
    hooks: dict[str, Callable[..., Any]] = {}
    for klass in reversed(cls.__mro__):
        if klass is AddOn or not issubclass(klass, AddOn):
            continue
        for attr, value in vars(klass).items():
            if attr.startswith(HOOK_PREFIX) and callable(value):
                hooks[attr] = value
    return hooks


def _check_hooks(cls: type[AddOn]) -> dict[Event, Callable[..., Any]]:
    found: dict[Event, Callable[..., Any]] = {}
    for attr, fn in _own_hooks(cls).items():
        if attr not in HOOK_NAMES:
            close = difflib.get_close_matches(attr, sorted(HOOK_NAMES), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise AddOnDefinitionError(
                f"add-on {cls.name!r} defines {attr}(), which is no event hook.{hint} "
                f"Hooks are named after zae_trainer.Event values; rename it, or drop the "
                f"'{HOOK_PREFIX}' prefix if it is a helper."
            )
        event = Event(attr)
        extra = EVENT_ARGUMENTS.get(event, ())
        expected = ("self", "trainer", *extra)
        try:
            inspect.signature(fn).bind(*expected)
        except TypeError:
            raise AddOnDefinitionError(
                f"add-on {cls.name!r}: {attr}{inspect.signature(fn)} cannot be called as "
                f"{attr}({', '.join(expected)}). To fix, give it the signature "
                f"def {attr}({', '.join(expected)})."
            ) from None
        found[event] = fn
    return found


def _uses_super(fn: Callable[..., Any]) -> bool:
    fn = inspect.unwrap(getattr(fn, "fget", fn))
    code = getattr(fn, "__code__", None)
    return code is not None and "super" in code.co_names


def _check_mixin(spec: AddOnSpec) -> dict[str, Any]:
    mixin = spec.cls.trainer_mixin
    if mixin is None:
        return {}
    overrides = {
        name: value
        for klass in mixin.__mro__
        if klass is not object
        for name, value in vars(klass).items()
        if not (name.startswith("__") and name.endswith("__"))
    }
    outside = sorted(set(overrides) - STRATEGY_METHODS)
    if outside:
        raise AddOnDefinitionError(
            f"add-on {spec.name!r}: its trainer_mixin {mixin.__name__} defines {outside}, but a strategy "
            f"may only override {sorted(STRATEGY_METHODS)}. To fix, move that logic into an event hook."
        )
    for name, value in overrides.items():
        if callable(getattr(value, "fget", value)) and not _uses_super(value):
            raise AddOnDefinitionError(
                f"add-on {spec.name!r}: {mixin.__name__}.{name} does not call super(), so it would hide "
                "the core and every other strategy. To fix, chain to super()." f"{name}(...)."
            )
    return overrides


def _order(specs: Sequence[AddOnSpec]) -> list[AddOnSpec]:
    """Topological order by ``runs_after`` / ``runs_before``; ties broken by (order, name).

    The tie-break never looks at argument order, so ``add_on(A, B)`` and ``add_on(B, A)``
    build the same dispatch table.
    """
    by_name = {s.name: s for s in specs}
    known = _identifiers(specs)  # any name a spec answers to -> its name
    after: dict[str, set[str]] = {s.name: set() for s in specs}  # name -> must come after these
    for s in specs:
        for other in s.cls.runs_after:
            target = known.get(normalise(other))
            if target is not None and target != s.name:
                after[s.name].add(target)
        for other in s.cls.runs_before:
            target = known.get(normalise(other))
            if target is not None and target != s.name:
                after[target].add(s.name)
    ready = [(s.cls.order, s.name) for s in specs if not after[s.name]]
    heapq.heapify(ready)
    placed: list[AddOnSpec] = []
    remaining = {n: set(deps) for n, deps in after.items()}
    while ready:
        _, name = heapq.heappop(ready)
        placed.append(by_name[name])
        for other, deps in remaining.items():
            if name in deps:
                deps.discard(name)
                if not deps:
                    heapq.heappush(ready, (by_name[other].cls.order, other))
    if len(placed) != len(specs):
        cycle = sorted(n for n, deps in remaining.items() if deps)
        raise AddOnDefinitionError(
            f"add-ons {cycle} declare runs_after/runs_before constraints that form a cycle; "
            "to fix, remove one of the constraints"
        )
    return placed


def _identifiers(specs: Sequence[AddOnSpec]) -> dict[str, str]:
    return {alias: s.name for s in specs for alias in aliases_of(s.cls)}


def _related(a: AddOnSpec, b: AddOnSpec) -> bool:
    a_names, b_names = aliases_of(a.cls), aliases_of(b.cls)
    return any(normalise(n) in b_names for n in (*a.cls.runs_after, *a.cls.runs_before)) or any(
        normalise(n) in a_names for n in (*b.cls.runs_after, *b.cls.runs_before)
    )


def _validate(specs: Sequence[AddOnSpec], base: type) -> list[AddOnSpec]:
    seen: dict[str, AddOnSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise AddOnDefinitionError(
                f"add-on {spec.name!r} is applied twice to {base.__name__}. Each add-on may appear once; "
                "to change its settings pass a configured instance instead of adding it again."
            )
        seen[spec.name] = spec
    known = _identifiers(specs)
    for spec in specs:
        for other in spec.cls.conflicts_with:
            target = known.get(normalise(other))
            if target is not None and target != spec.name:
                raise AddOnDefinitionError(
                    f"add-on {spec.name!r} declares a conflict with {target!r}; they cannot be combined. "
                    "Remove one of them."
                )
    ordered = _order(specs)
    overridden: dict[str, AddOnSpec] = {}
    exported: dict[str, AddOnSpec] = {}
    for spec in ordered:
        _check_hooks(spec.cls)
        for method in _check_mixin(spec):
            prior = overridden.get(method)
            if prior is not None and not _related(prior, spec):
                raise AddOnDefinitionError(
                    f"add-ons {prior.name!r} and {spec.name!r} both override {method}() without declaring "
                    "which wraps which. To fix, declare runs_after/runs_before between them."
                )
            overridden[method] = spec
        for name in spec.cls.exports:
            if not callable(getattr(spec.cls, name, None)):
                raise AddOnDefinitionError(
                    f"add-on {spec.name!r} exports {name!r}, which is not one of its methods"
                )
            if name in exported:
                raise AddOnDefinitionError(
                    f"add-ons {exported[name].name!r} and {spec.name!r} both export {name}() to the trainer; "
                    "rename one of them"
                )
            exported[name] = spec
    return ordered


# -- building ----------------------------------------------------------------------------


def _export(index: int, name: str) -> Callable[..., Any]:
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.addon_instances[index], name)(*args, **kwargs)

    forward.__name__ = name
    return forward


def _handler_table(specs: Sequence[AddOnSpec]) -> dict[Event, tuple[tuple[int, Callable[..., Any]], ...]]:
    table: dict[Event, tuple[tuple[int, Callable[..., Any]], ...]] = {}
    hooks = [_check_hooks(s.cls) for s in specs]
    for event in Event:
        chain = [(i, h[event]) for i, h in enumerate(hooks) if event in h]
        if event.is_reversed:
            chain.reverse()
        if chain:
            table[event] = tuple(chain)
    return table


def build_trainer_class(base: type, addons: Iterable[Any]) -> type:
    """Return a new subclass of ``base`` holding ``addons`` (see ``Trainer.add_on``)."""
    raw = tuple(addons)
    converted = [_to_spec(a) for a in raw]
    new_specs = [c for c in converted if isinstance(c, AddOnSpec)]
    legacy = [c for c in converted if not isinstance(c, AddOnSpec)]

    inherited: tuple[AddOnSpec, ...] = getattr(base, "_zt_specs", ())
    specs = _validate([*inherited, *new_specs], base)
    mixins = tuple(s.cls.trainer_mixin for s in specs if s.cls.trainer_mixin is not None)
    parent_mixins = set(base.__mro__)
    mixins = tuple(m for m in mixins if m not in parent_mixins)

    names = [s.name for s in specs]
    root_name = getattr(base, "_zt_root_name", base.__name__)
    display = f"{root_name}[{', '.join(names)}]" if names else root_name
    namespace: dict[str, Any] = {
        "__module__": base.__module__,
        "__qualname__": display,
        "__doc__": base.__doc__,
        "_zt_specs": tuple(specs),
        "_zt_handlers": _handler_table(specs),
        "_zt_recipe": (base, tuple(_picklable(a) for a in raw)),
        "_zt_root_name": root_name,
        "addons": tuple(s.cls for s in specs),  # declared (dispatch) order
    }
    for index, spec in enumerate(specs):
        for name in spec.cls.exports:
            namespace[name] = _export(index, name)
    built = type(base)(display, (*mixins, base), namespace)
    for legacy_cls in legacy:
        applied = legacy_cls.apply(built)
        if not (isinstance(applied, type) and issubclass(applied, built)):
            raise AddOnDefinitionError(
                f"{legacy_cls.__name__}.apply() must return a subclass of the class it was given, "
                f"got {applied!r}"
            )
        built = applied
    if legacy:
        setattr(built, "addons", (*getattr(built, "addons"), *legacy))
        setattr(built, "_zt_recipe", (base, tuple(_picklable(a) for a in raw)))
    return built


def _picklable(addon: Any) -> Any:
    """Instances are stored as specs: a spec pickles as (class, settings)."""
    if isinstance(addon, AddOn):
        return AddOnSpec(type(addon), dict(addon._given_settings))
    return addon


def rebuild(base: type, addons: tuple[Any, ...]) -> type:
    """Inverse of pickling a built class: build it again in this process."""
    specs_or_raw = [
        (s.cls(**s.preset) if s.preset else s.cls) if isinstance(s, AddOnSpec) else s for s in addons
    ]
    return build_trainer_class(base, specs_or_raw)


def reduce_trainer_class(cls: type) -> Any:
    """``copyreg`` reducer for the trainer metaclass: built classes pickle by recipe."""
    recipe = cls.__dict__.get("_zt_recipe")
    if recipe is None:
        return cls.__qualname__  # an ordinary class: pickle by reference
    return (rebuild, recipe)


# -- settings routing ------------------------------------------------------------------


def route_settings(
    specs: Sequence[AddOnSpec], given: Mapping[str, Any], core_names: Iterable[str], owner: str
) -> list[dict[str, Any]]:
    """Split constructor keywords among add-ons, by what each declares.

    A keyword declared by several add-ons reaches each of them. A keyword nobody declares is a
    ``TypeError`` naming the closest accepted names; a missing required setting names the
    add-on that needs it.
    """
    accepted: dict[str, list[str]] = {}
    for spec in specs:
        for name in spec.cls.settings():
            accepted.setdefault(name, []).append(spec.name)
    unknown = [k for k in given if k not in accepted]
    if unknown:
        candidates = sorted({*accepted, *core_names})
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
            parts.append(f"{key!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        raise TypeError(
            f"{owner}() got unexpected keyword argument(s) {', '.join(parts)}. "
            f"Accepted: the core's {sorted(core_names)} and the add-ons' {sorted(accepted) or '(none)'}."
        )
    routed: list[dict[str, Any]] = []
    for spec in specs:
        settings = spec.cls.settings()
        kwargs = dict(spec.preset)
        kwargs.update({k: v for k, v in given.items() if k in settings})
        missing = [n for n, d in settings.items() if d is REQUIRED and n not in kwargs]
        if missing:
            raise TypeError(
                f"add-on {spec.name!r} needs the setting(s) {missing}: pass them to {owner}(...) as "
                f"keywords, or configure the add-on as {spec.cls.__name__}({', '.join(f'{m}=...' for m in missing)})"
            )
        routed.append(kwargs)
    return routed


def register_pickling(metaclass: type) -> None:
    """Make classes built with ``metaclass`` picklable by recipe (see :func:`reduce_trainer_class`)."""
    copyreg.pickle(metaclass, reduce_trainer_class)
