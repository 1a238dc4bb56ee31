"""Gradient accumulation (the core's ``accumulate_grad_batches``): equivalence, counts, trailing group, no_sync."""

from __future__ import annotations

from typing import Any, ContextManager, Iterator

import pytest
import torch
from torch import nn

from zae_trainer import AddOn
from zae_trainer.addons.clipping import GradientClippingAddon
from zae_trainer.testing import TinyRegressionTrainer, tiny_loader


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(iter(tiny_loader(n, n, seed=seed)))
    return x, y


def _chunks(n_batches: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _data(n_batches * size)
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(n_batches)]


def _trainer(optimizer: str = "sgd", **settings: Any) -> Any:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cls = settings.pop("cls", TinyRegressionTrainer)
    settings.setdefault("log_bar", False)
    settings.setdefault("handle_signals", False)
    return cls(model, "cpu", "train", opt, settings.pop("scheduler", None), **settings)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_n_batches_of_b_accumulate_to_one_batch_of_n_times_b(optimizer: str) -> None:
    n, b, groups = 4, 5, 3
    small = _trainer(optimizer, accumulate_grad_batches=n)
    small.run(1, _chunks(n * groups, b))
    big = _trainer(optimizer)
    big.run(1, _chunks(groups, n * b))
    for got, want in zip(small.model.parameters(), big.model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (small.progress_checker.step, big.progress_checker.step) == (groups, groups)


class CountSteps(AddOn):
    def __init__(self) -> None:
        self.after_step = 0
        self.before_step = 0
        self.batches_at_step: list[int] = []

    def on_before_optimizer_step(self, trainer: Any) -> None:
        self.before_step += 1
        self.batches_at_step.append(trainer.progress_checker.batch_in_epoch)

    def on_after_optimizer_step(self, trainer: Any) -> None:
        self.after_step += 1


def test_steps_and_batches_are_counted_distinctly_and_the_trailing_group_is_stepped() -> None:
    trainer = _trainer(cls=TinyRegressionTrainer.add_on(CountSteps), accumulate_grad_batches=4)
    trainer.run(2, _chunks(10, 4))
    counter = trainer.get_addon("CountSteps")
    pc = trainer.progress_checker
    assert (pc.step, pc.batches, pc.samples, pc.epoch) == (6, 20, 80, 2)  # 3 steps per epoch: 4 + 4 + 2 batches
    assert counter.after_step == counter.before_step == 6
    assert counter.batches_at_step == [4, 8, 10, 4, 8, 10]


def test_the_trailing_group_matches_a_hand_written_loop() -> None:
    n = 4
    batches = _chunks(10, 4)
    trainer = _trainer(accumulate_grad_batches=n)
    trainer.run(1, batches)

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i, (x, y) in enumerate(batches):
        (nn.functional.mse_loss(model(x), y) / n).backward()  # the trailing pair is scaled by 1/N too
        if (i + 1) % n == 0 or i + 1 == len(batches):
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), model.parameters()))


class Unsized:
    """An iterable without ``len``: the loop learns the epoch ended only when it does."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)


def test_the_trailing_group_of_an_unsized_loader_is_stepped() -> None:
    sized = _trainer(accumulate_grad_batches=4)
    sized.run(1, _chunks(10, 4))
    unsized = _trainer(cls=TinyRegressionTrainer.add_on(CountSteps), accumulate_grad_batches=4)
    unsized.run(1, Unsized(_chunks(10, 4)))
    assert unsized.progress_checker.step == 3 and unsized.get_addon("CountSteps").batches_at_step == [4, 8, 10]
    assert all(torch.equal(a, b) for a, b in zip(sized.model.parameters(), unsized.model.parameters()))


def test_a_per_batch_scheduler_steps_every_n_batches() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = TinyRegressionTrainer(model, "cpu", "train", opt, scheduler, log_bar=False, handle_signals=False,
                                    scheduler_step_on_batch=True, accumulate_grad_batches=3)
    trainer.run(1, _chunks(7, 4))  # groups of 3, 3, 1: three optimizer steps
    assert trainer.current_lr() == pytest.approx(0.5**3)
    assert scheduler.last_epoch == 3


class CountNoSync(AddOn):
    """A strategy that counts the micro-batches run under ``no_sync`` (DDP skips the all-reduce there)."""

    class Mixin:
        def no_sync(self) -> ContextManager[Any]:
            self.get_addon("CountNoSync").entered += 1  # type: ignore[attr-defined]
            return super().no_sync()  # type: ignore[misc, no-any-return]

    trainer_mixin = Mixin

    def __init__(self) -> None:
        self.entered = 0


def test_only_non_final_micro_batches_run_under_no_sync() -> None:
    trainer = _trainer(cls=TinyRegressionTrainer.add_on(CountNoSync), accumulate_grad_batches=4)
    trainer.run(1, _chunks(10, 4))
    assert trainer.get_addon("CountNoSync").entered == 7  # all but batches 4, 8 and the last (10)
    plain = _trainer(cls=TinyRegressionTrainer.add_on(CountNoSync))
    plain.run(1, _chunks(10, 4))
    assert plain.get_addon("CountNoSync").entered == 0


def test_clipping_acts_once_per_group_on_the_accumulated_gradients() -> None:
    class Logged(AddOn):  # log_every_n_steps=1: each LOG holds one step's norm
        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_log(self, trainer: Any, metrics: dict[str, float]) -> None:
            self.norms.append(metrics["train/grad_norm"])

    trainer = _trainer(cls=TinyRegressionTrainer.add_on(GradientClippingAddon(max_norm=1e9), Logged),
                       accumulate_grad_batches=5, log_every_n_steps=1)
    trainer.run(1, _chunks(10, 4))
    norms = trainer.get_addon(Logged).norms
    assert len(norms) == 2

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    for x, y in _chunks(10, 4)[:5]:
        (nn.functional.mse_loss(model(x), y) / 5).backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))  # type: ignore[union-attr]
    assert norms[0] == pytest.approx(float(expected), rel=1e-6)

