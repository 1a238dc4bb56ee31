"""Every built-in usable on a CPU, composed in every argument order: identical parameters and event traces.

Ordering between add-ons is declared in code (``order``, ``runs_after``, ``runs_before``), so the
order in which a user lists them must change nothing. The run is short but exercises every
interaction that could depend on order: fp16 loss scaling (unscale before clip), clipping, a
skipped non-finite step, throughput and loggers on ``LOG``, early stopping and checkpoints at
``EPOCH_END``.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from core_helpers import Recorder
from zae_trainer import AddOn
from zae_trainer.testing import BUILTIN_FACTORIES, TinyRegressionTrainer, check_addon, tiny_loader, tiny_trainer, usable_builtins

MINE = ("gradient_clipping", "early_stopping", "precision_mixer", "nonfinite_guard", "throughput")

#: Settings that make each add-on do real work in a short run (the rest come from BUILTIN_FACTORIES).
SETTINGS: dict[str, dict[str, Any]] = {
    "precision_mixer": {"precision": "fp16", "init_scale": 256.0},
    "gradient_clipping": {"max_norm": 0.5},
    "nonfinite_guard": {"policy": "skip"},
    "early_stopping": {"patience": 1, "monitor": "train/mae"},
    "local_logger": {"tensorboard": False, "plot": False},
}


def _instances(names: tuple[str, ...], folder: Path) -> list[AddOn]:
    classes = usable_builtins()
    made = []
    for name in names:
        cls = classes[name]
        sub = folder / name
        settings = {**BUILTIN_FACTORIES[name](sub), **SETTINGS.get(name, {})}
        accepted = cls.settings()
        made.append(cls(**{k: v for k, v in settings.items() if k in accepted}))
    return made


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = [tuple(t.clone() for t in b) for b in tiny_loader(24)]
    batches[1][0][0, 0] = float("nan")  # the guard skips step 2
    return batches  # type: ignore[return-value]


def _run(order: tuple[str, ...], folder: Path) -> tuple[list[torch.Tensor], list[str], tuple[str, ...]]:
    cls = TinyRegressionTrainer.add_on(*_instances(order, folder), Recorder)
    trainer = tiny_trainer(cls, log_every_n_steps=1)
    trainer.run(2, _batches(), tiny_loader(8, seed=5))
    params = [p.detach().clone() for p in trainer.model.parameters()]
    return params, trainer.get_addon("Recorder").trace, tuple(a.name for a in cls.addons)


def _orders(names: tuple[str, ...], limit: int) -> list[tuple[str, ...]]:
    every = list(itertools.permutations(names))
    if len(every) <= limit:
        return every
    random.Random(0).shuffle(every)
    return every[:limit]


def _assert_all_identical(names: tuple[str, ...], limit: int, tmp_path: Path) -> int:
    orders = _orders(names, limit)
    reference_params, reference_trace, reference_dispatch = _run(orders[0], tmp_path / "run0")
    assert "TRAIN_BATCH_END e0 s2" in reference_trace  # the skipped step still ends its batch
    assert all(torch.isfinite(p).all() for p in reference_params)
    for index, order in enumerate(orders[1:], start=1):
        params, trace, dispatch = _run(order, tmp_path / f"run{index}")
        assert dispatch == reference_dispatch, f"argument order {order} changed the declared order"
        assert trace == reference_trace, f"argument order {order} changed the event trace"
        assert all(torch.equal(a, b) for a, b in zip(params, reference_params)), f"argument order {order} changed the parameters"
    return len(orders)


@pytest.mark.slow
def test_every_order_of_my_addons_and_the_state_manager(tmp_path: Path) -> None:
    names = tuple(n for n in ("state_manager", *MINE) if n in usable_builtins())
    assert _assert_all_identical(names, limit=720, tmp_path=tmp_path) == 720  # 6! orders


def test_a_sample_of_orders_of_every_usable_builtin(tmp_path: Path) -> None:
    names = tuple(usable_builtins())
    assert set(MINE) <= set(names)
    _assert_all_identical(names, limit=60, tmp_path=tmp_path)


def test_declared_order_puts_each_constraint_in_place(tmp_path: Path) -> None:
    names = tuple(usable_builtins())
    cls = TinyRegressionTrainer.add_on(*_instances(names, tmp_path))
    declared = [a.name for a in cls.addons]
    at = declared.index
    assert at("nonfinite_guard") < at("precision_mixer") < at("gradient_clipping")  # guard, unscale, clip
    assert at("state_manager") < at("early_stopping")  # reversed on EPOCH_END: decide, then save
    if "local_logger" in declared:
        assert at("throughput") < at(declared[-1]) and at("throughput") < at("local_logger")


def test_conformance_of_each_of_my_addons_with_its_composition_settings(tmp_path: Path) -> None:
    for name in MINE:
        cls = usable_builtins()[name]
        settings = {**BUILTIN_FACTORIES[name](tmp_path), **SETTINGS.get(name, {})}
        skip = ("sync",) if name == "nonfinite_guard" or name == "precision_mixer" else ()  # skip / fp16 read per step
        skip += ("compose",)  # composition is what the tests above check, more strictly
        check_addon(cls, settings, workdir=tmp_path, skip=skip)
