"""The add-on conformance checks.

Each check builds tiny trainers (:mod:`zae_trainer.testing.tiny`) with the add-on under test
and asserts one property every add-on must have. They raise ``AssertionError`` naming what
failed, so they read well inside pytest and anywhere else.
"""

from __future__ import annotations

import collections
import importlib
import itertools
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..addon import AddOn
from ..composition import build_trainer_class
from ..registry import BUILTIN_ADDONS
from .tiny import TinyRegressionTrainer, tiny_loader, tiny_trainer

__all__ = [
    "BUILTIN_FACTORIES",
    "usable_builtins",
    "check_addon",
    "check_hook_names",
    "check_composes_with_builtins",
    "check_state_round_trip",
    "check_no_per_step_sync",
    "check_pickling",
]

AddOnLike = Any  # an AddOn subclass or a configured instance

#: How to configure each built-in for a composition test run on the CPU, given a scratch
#: folder. Built-ins that need several processes or an account are left out.
BUILTIN_FACTORIES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "state_manager": lambda folder: {"save_path": str(folder / "checkpoints")},
    "gradient_clipping": lambda folder: {"max_norm": 0.5},
    "early_stopping": lambda folder: {"patience": 100},
    "precision_mixer": lambda folder: {"precision": "fp32"},
    "nonfinite_guard": lambda folder: {},
    "throughput": lambda folder: {},
    "local_logger": lambda folder: {"log_dir": str(folder / "logs"), "plot": False},
}


def usable_builtins() -> dict[str, type[AddOn]]:
    """The built-ins of :data:`BUILTIN_FACTORIES` that import in this environment."""
    found: dict[str, type[AddOn]] = {}
    for name in BUILTIN_FACTORIES:
        module, _, attr = BUILTIN_ADDONS[name].partition(":")
        try:
            found[name] = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
    return found


def _configured(addon: AddOnLike, settings: Mapping[str, Any] | None) -> AddOn:
    if isinstance(addon, AddOn):
        if settings:
            return type(addon)(**{**addon._given_settings, **settings})
        return addon
    if isinstance(addon, type) and issubclass(addon, AddOn):
        return addon(**dict(settings or {}))
    raise AssertionError(f"{addon!r} is not an AddOn subclass or instance")


def _builtin_instances(folder: Path, exclude: str) -> list[AddOn]:
    instances = []
    for name, cls in usable_builtins().items():
        if cls.name == exclude:
            continue
        sub = folder / name
        sub.mkdir(parents=True, exist_ok=True)
        try:
            instances.append(cls(**BUILTIN_FACTORIES[name](sub)))
        except TypeError:
            continue  # its settings changed; the built-in's own tests cover it
    return instances


def _train(addons: list[AddOn], epochs: int = 2, base: type = TinyRegressionTrainer) -> Any:
    trainer = tiny_trainer(build_trainer_class(base, addons))
    trainer.run(epochs, tiny_loader(shuffle=True, seed=3), tiny_loader(16, seed=7))
    return trainer


def check_hook_names(addon: AddOnLike) -> None:
    """Every ``on_*`` method is a real event with the right signature (checked at class build)."""
    cls = addon if isinstance(addon, type) else type(addon)
    build_trainer_class(TinyRegressionTrainer, [cls])


def check_composes_with_builtins(
    addon: AddOnLike, settings: Mapping[str, Any] | None = None, max_orders: int = 6, workdir: Path | None = None
) -> list[str]:
    """Composed with every usable built-in, in several argument orders, training ends with
    identical parameters. Returns the names of the built-ins it was composed with."""
    target = _configured(addon, settings)
    results: list[tuple[tuple[str, ...], list[torch.Tensor]]] = []
    with tempfile.TemporaryDirectory(prefix="zae-conformance-", dir=workdir) as scratch:
        base_folder = Path(scratch)
        probe = _builtin_instances(base_folder / "probe", exclude=target.name)
        names = [type(a).name for a in probe]
        orders = list(itertools.permutations(range(len(probe) + 1)))
        random.Random(0).shuffle(orders)
        for run_index, order in enumerate(orders[: max(2, max_orders)]):
            folder = base_folder / f"run{run_index}"
            others = _builtin_instances(folder, exclude=target.name)
            everything = [*others, _configured(target, None)]
            arranged = [everything[i] for i in order]
            trainer = _train(arranged)
            params = [p.detach().clone() for p in trainer.model.parameters()]
            results.append((tuple(type(a).name for a in arranged), params))
    first_order, first = results[0]
    for arrangement, params in results[1:]:
        if not all(torch.equal(a, b) for a, b in zip(first, params)):
            raise AssertionError(
                f"{target.name}: final parameters differ between argument orders {first_order} and {arrangement}; "
                "declare ordering with order / runs_after / runs_before instead of relying on argument order"
            )
    return names


def _equal_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_equal_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal_state(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:  # both NaN
        return True
    return bool(a == b)


def check_state_round_trip(
    addon: AddOnLike, settings: Mapping[str, Any] | None = None, workdir: Path | None = None
) -> list[str]:
    """The add-on's ``state_dict`` survives a checkpoint in every format the state manager
    writes, and ``load_state_dict`` restores it. Returns the formats checked."""
    target = _configured(addon, settings)
    try:
        from ..addons.state_manager import StateManagerAddon
    except ImportError as exc:  # pragma: no cover - the state manager ships with the core
        raise AssertionError(f"StateManagerAddon is needed for this check: {exc}") from exc
    checked = []
    with tempfile.TemporaryDirectory(prefix="zae-conformance-", dir=workdir) as scratch:
        is_manager = isinstance(target, StateManagerAddon)
        for fmt in ("ckpt", "safetensors"):
            folder = os.path.join(scratch, fmt)

            def addons(first_run: bool) -> list[AddOn]:
                manager_settings: dict[str, Any] = {"save_path": folder, "save_format": fmt}
                if first_run:
                    manager_settings.update(save_last=False, keep_top_k=0)
                if is_manager:  # the add-on under test is the state manager itself
                    return [type(target)(**{**target._given_settings, **manager_settings})]
                return [StateManagerAddon(**manager_settings), _configured(target, None)]

            trainer = _train(addons(first_run=True), epochs=1)
            path = trainer.save_state()
            expected = trainer.get_addon(target.name).state_dict()
            fresh = tiny_trainer(build_trainer_class(TinyRegressionTrainer, addons(first_run=False)))
            fresh.load_state(path)
            restored = fresh.get_addon(target.name).state_dict()
            if not _equal_state(expected, restored):
                raise AssertionError(
                    f"{target.name}: state_dict after a {fmt} checkpoint round trip differs: saved {expected!r}, "
                    f"restored {restored!r}. Keep state to tensors and plain values, and restore every key."
                )
            checked.append(fmt)
    return checked


_CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy", "__index__")


def check_no_per_step_sync(addon: AddOnLike, settings: Mapping[str, Any] | None = None, steps: int = 30) -> int:
    """Between log points, the add-on converts no tensor to a Python value.

    Runs ``steps`` steps with ``log_every_n_steps = steps`` and counts calls of the tensor
    methods that read device memory from the host; on CUDA such a call would stall the
    loop every step. Returns the number counted during the steps: at most one is allowed
    (a value read once per interval, e.g. lazily on the first step).
    """
    target = _configured(addon, settings)
    counts: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _CONVERSIONS}

    def counting(name: str) -> Callable[..., Any]:
        original = originals[name]

        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    trainer = tiny_trainer(build_trainer_class(TinyRegressionTrainer, [target]), log_every_n_steps=steps)
    batches = list(tiny_loader(8 * steps))  # a list: DataLoader iteration itself calls .item()
    trainer.run(1, batches[:2])  # warm-up: lazy initialisation may read values once
    try:
        for name in _CONVERSIONS:
            setattr(torch.Tensor, name, counting(name))
        run = steps - 1 - trainer.progress_checker.step % steps  # stop just before the next log point
        for batch in batches[:run]:
            trainer._train_batch(batch)  # one batch, as the loop runs it
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    total = sum(counts.values())
    if total > 1:
        raise AssertionError(
            f"{target.name}: {total} host reads of tensor values in {run} steps ({dict(counts)}): that is a "
            "device synchronisation per step. Keep values on the device and read them at log points (Event.LOG)."
        )
    return total


def check_pickling(addon: AddOnLike, settings: Mapping[str, Any] | None = None) -> None:
    """A trainer class built with the add-on pickles and rebuilds (as spawned workers need),
    keeping the add-on's configured settings."""
    target = _configured(addon, settings)
    built = build_trainer_class(TinyRegressionTrainer, [target])
    try:
        clone = pickle.loads(pickle.dumps(built))
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise AssertionError(
            f"{target.name}: a trainer class holding it cannot be pickled ({exc}). Spawned workers import "
            "add-ons by reference: define the class at module top level, and keep its settings picklable."
        ) from exc
    held, expected = getattr(clone, "addons", None), getattr(built, "addons", None)
    if held != expected:
        raise AssertionError(f"{target.name}: pickled class holds {held}, expected {expected}")
    rebuilt_settings = dict(clone._zt_specs[0].preset)
    if rebuilt_settings != dict(target._given_settings):
        raise AssertionError(
            f"{target.name}: settings changed through pickling: {target._given_settings} -> {rebuilt_settings}"
        )


def check_addon(
    addon: AddOnLike,
    settings: Mapping[str, Any] | None = None,
    *,
    workdir: Path | None = None,
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run every conformance check; return what each checked. ``skip`` names checks to leave out
    (``"compose"``, ``"state"``, ``"sync"``, ``"pickle"``) with a reason in your test."""
    report: dict[str, Any] = {}
    check_hook_names(addon)
    report["hooks"] = "ok"
    if "pickle" not in skip:
        check_pickling(addon, settings)
        report["pickle"] = "ok"
    if "sync" not in skip:
        report["sync"] = check_no_per_step_sync(addon, settings)
    if "state" not in skip:
        report["state"] = check_state_round_trip(addon, settings, workdir=workdir)
    if "compose" not in skip:
        report["compose"] = check_composes_with_builtins(addon, settings, workdir=workdir)
    return report
