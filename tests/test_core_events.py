"""The event sequence is a fixture: changing it must be a visible decision (tests/fixtures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from core_helpers import Recorder, StepLossTrainer, TinyTrainer, tiny_loader, tiny_trainer
from zae_trainer import AddOn, Event, SkipStep, Trainer

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "event_sequences.json").read_text())


def test_event_sequence_with_validation_matches_fixture() -> None:
    trainer = tiny_trainer(TinyTrainer.add_on(Recorder), log_every_n_steps=2)
    trainer.run(2, tiny_loader(20, 8), tiny_loader(10, 8, seed=1))
    assert trainer.get_addon(Recorder).trace == FIXTURES["with_validation"]


class _RaisesAtStep1(TinyTrainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        if self.progress_checker.step == 1:
            raise ValueError("boom at step 1")
        return super().train_step(batch)


def test_event_sequence_when_train_step_raises_matches_fixture_and_error_propagates_unchanged() -> None:
    trainer = tiny_trainer(_RaisesAtStep1.add_on(Recorder), log_every_n_steps=2)
    with pytest.raises(ValueError, match="boom at step 1") as info:
        trainer.run(2, tiny_loader(20, 8), tiny_loader(10, 8, seed=1))
    assert type(info.value) is ValueError  # not wrapped
    assert trainer.get_addon(Recorder).trace == FIXTURES["train_step_raises"]
    assert trainer.summary.status == "failed"


def test_every_event_in_the_enum_is_documented_in_the_module_docstring() -> None:
    import zae_trainer.events as events

    for event in Event:
        assert event.name in events.__doc__, f"{event.name} missing from the pseudocode"


def _order_recorder(name: str, log: list[str], **declared: Any) -> type[AddOn]:
    def begin(self: AddOn, trainer: Any) -> None:
        log.append(f"{name}.begin")

    def end(self: AddOn, trainer: Any) -> None:
        log.append(f"{name}.end")

    namespace = {"name": name, "on_epoch_begin": begin, "on_epoch_end": end, **declared}
    return type(name, (AddOn,), namespace)


def test_end_events_run_in_reverse_declared_order_whatever_the_argument_order() -> None:
    log: list[str] = []
    first = _order_recorder("First", log, order=-10)
    second = _order_recorder("Second", log, runs_after=("First",))
    third = _order_recorder("Third", log, runs_after=("Second",))
    traces = []
    for args in [(first, second, third), (third, first, second), (second, third, first)]:
        log.clear()
        tiny_trainer(TinyTrainer.add_on(*args)).run(1, tiny_loader())
        traces.append(list(log))
    expected = ["First.begin", "Second.begin", "Third.begin", "Third.end", "Second.end", "First.end"]
    assert traces == [expected] * 3


def test_every_subscribed_addon_runs_although_none_calls_super() -> None:
    calls: list[str] = []

    class A(AddOn):
        def on_train_batch_end(self, trainer: Any) -> None:
            calls.append("A")

    class B(AddOn):
        def on_train_batch_end(self, trainer: Any) -> None:
            calls.append("B")

    tiny_trainer(TinyTrainer.add_on(A, B)).run(1, tiny_loader(16, 8))
    assert sorted(calls) == ["A", "A", "B", "B"]


def test_hook_exception_keeps_its_type_and_a_note_names_addon_and_event() -> None:
    class Faulty(AddOn):
        def on_epoch_end(self, trainer: Any) -> None:
            raise KeyError("missing thing")

    trainer = tiny_trainer(TinyTrainer.add_on(Faulty, Recorder))
    with pytest.raises(KeyError, match="missing thing") as info:
        trainer.run(1, tiny_loader())
    assert type(info.value) is KeyError  # not wrapped: `except KeyError` around run() catches it
    assert info.value.__notes__ == ["raised by add-on 'Faulty' while handling Event.EPOCH_END"]
    assert trainer.get_addon(Recorder).trace[-2:] == ["EXCEPTION e1 s3 KeyError", "RUN_END e1 s3"]


def test_per_batch_hook_exception_keeps_its_type_and_names_the_addon() -> None:
    class Custom(Exception):
        pass

    class FaultyStep(AddOn):
        def on_after_backward(self, trainer: Any) -> None:
            raise Custom("bad gradient")

    with pytest.raises(Custom) as info:
        tiny_trainer(TinyTrainer.add_on(FaultyStep)).run(1, tiny_loader())
    assert info.value.__notes__ == ["raised by add-on 'FaultyStep' while handling Event.AFTER_BACKWARD"]


def test_skip_step_leaves_parameters_unchanged_and_is_counted() -> None:
    class SkipAll(AddOn):
        def on_before_optimizer_step(self, trainer: Any) -> None:
            raise SkipStep("testing")

        def on_after_optimizer_step(self, trainer: Any) -> None:  # must never fire
            raise AssertionError("AFTER_OPTIMIZER_STEP fired for a skipped step")

    trainer = tiny_trainer(TinyTrainer.add_on(SkipAll))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.run(1, tiny_loader(20, 8))
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert trainer.progress_checker.skipped_steps == 3
    assert all(p.grad is None for p in trainer.model.parameters())


def test_request_stop_ends_the_epoch_early_and_fires_end_events() -> None:
    class StopAfterTwoBatches(AddOn):
        def on_train_batch_end(self, trainer: Any) -> None:
            if trainer.progress_checker.batch_in_epoch == 2:
                trainer.request_stop("enough")

    trainer = tiny_trainer(TinyTrainer.add_on(StopAfterTwoBatches, Recorder))
    trainer.run(5, tiny_loader(40, 8), tiny_loader(8, 8))
    trace = trainer.get_addon(Recorder).trace
    assert trainer.stop_reason == "enough" and trainer.summary.status == "stopped"
    assert trainer.progress_checker.step == 2 and trainer.progress_checker.epoch == 1
    assert [t.split()[0] for t in trace[-2:]] == ["EPOCH_END", "RUN_END"]
    assert not any(t.startswith("VALID_BEGIN") for t in trace)  # a stopped epoch is not validated
    assert "stopped early: enough" in str(trainer.summary)


def test_an_event_nobody_listens_to_costs_no_dispatch() -> None:
    class OnlyEpochEnd(AddOn):
        def on_epoch_end(self, trainer: Any) -> None:
            pass

    built = TinyTrainer.add_on(OnlyEpochEnd)
    assert set(built._zt_handlers) == {Event.EPOCH_END}
    trainer = tiny_trainer(built)
    per_batch = ("_fire_batch_begin", "_fire_before_backward", "_fire_after_backward", "_fire_before_step",
                 "_fire_after_step", "_fire_batch_end", "_fire_valid_batch_end")
    assert [getattr(trainer, name) for name in per_batch] == [None] * len(per_batch)


def test_log_event_carries_floats_from_the_flushed_interval() -> None:
    seen: list[dict[str, float]] = []

    class Catch(AddOn):
        def on_log(self, trainer: Any, metrics: dict[str, float]) -> None:
            seen.append(dict(metrics))

    trainer = tiny_trainer(StepLossTrainer.add_on(Catch), log_every_n_steps=2)
    trainer.run(1, tiny_loader(32, 8))
    assert len(seen) == 2 and all(set(m) == {"train/loss"} for m in seen)
    history = trainer.step_losses
    assert seen[0]["train/loss"] == pytest.approx(sum(history[:2]) / 2)
    assert all(isinstance(v, float) for m in seen for v in m.values())


def test_addon_hooks_see_the_trainer_and_their_own_namespace() -> None:
    class Counter(AddOn):
        def __init__(self, *, start: int = 0) -> None:
            self.count = start

        def on_train_batch_end(self, trainer: Trainer) -> None:
            assert trainer is self.trainer
            self.count += 1

    class OtherCounter(Counter):
        name = "OtherCounter"

    trainer = tiny_trainer(TinyTrainer.add_on(Counter, OtherCounter(start=100)), start=10)
    trainer.run(1, tiny_loader(16, 8))
    assert trainer.get_addon("Counter").count == 12
    assert trainer.get_addon("OtherCounter").count == 12  # the keyword reaches every declarer
