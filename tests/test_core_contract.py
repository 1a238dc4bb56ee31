"""The core's extension points and its contract with add-ons (zae_trainer.contract)."""

from __future__ import annotations

import io
import signal
from typing import Any

import pytest
import torch
from torch import nn

from core_helpers import Recorder, TinyTrainer, tiny_loader, tiny_trainer
from zae_trainer import AddOn, Event, Trainer, TrainerConfigError, TrainerView
from zae_trainer.addons import GradientClippingAddon, NonFiniteGuardAddon, PrecisionMixerAddon
from zae_trainer.checks import is_better
from zae_trainer.signals import StopSignals


class PhaseLog(AddOn):
    """Records (event, phase) for the events around phases."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def on_valid_begin(self, trainer: TrainerView) -> None:
        self.seen.append(("VALID_BEGIN", trainer.phase))

    def on_valid_batch_end(self, trainer: TrainerView) -> None:
        self.seen.append(("VALID_BATCH_END", trainer.phase))

    def on_valid_end(self, trainer: TrainerView) -> None:
        self.seen.append(("VALID_END", trainer.phase))

    def on_train_batch_end(self, trainer: TrainerView) -> None:
        self.seen.append(("TRAIN_BATCH_END", trainer.phase))

    def on_epoch_end(self, trainer: TrainerView) -> None:
        self.seen.append(("EPOCH_END", trainer.phase))


def test_phase_follows_the_batches_and_the_run_kind_never_flips() -> None:
    class Kinds(TinyTrainer):
        def record_step(self, outputs: Any, batch_size: int) -> None:
            super().record_step(outputs, batch_size)
            self.kinds.add((self.phase, self.run_kind, self.model.training))

    trainer = tiny_trainer(Kinds.add_on(PhaseLog))
    trainer.kinds = set()
    trainer.run(1, tiny_loader(16, 8), tiny_loader(8, 8, seed=1))
    assert trainer.get_addon(PhaseLog).seen == [
        ("TRAIN_BATCH_END", "train"), ("TRAIN_BATCH_END", "train"),
        ("VALID_BEGIN", "valid"), ("VALID_BATCH_END", "valid"), ("VALID_END", "valid"),
        ("EPOCH_END", "train"),
    ]
    assert trainer.kinds == {("train", "train", True), ("valid", "train", False)}


def test_record_step_sees_every_batch_of_every_phase_with_its_size() -> None:
    class Sizes(TinyTrainer):
        def record_step(self, outputs: Any, batch_size: int) -> None:
            self.sizes.append((self.phase, batch_size, sorted(outputs)))
            super().record_step(outputs, batch_size)

    trainer = tiny_trainer(Sizes)
    trainer.sizes = []
    trainer.run(1, tiny_loader(20, 8), tiny_loader(10, 8, seed=1))
    assert trainer.sizes == [
        ("train", 8, ["loss"]), ("train", 8, ["loss"]), ("train", 4, ["loss"]),
        ("valid", 8, ["loss", "output"]), ("valid", 2, ["loss", "output"]),
    ]
    assert set(trainer.epoch_metrics) == {"train/loss", "valid/loss"}


def test_phase_end_metrics_are_added_to_the_epoch_metrics_of_their_phase() -> None:
    class Extra(TinyTrainer):
        def phase_end_metrics(self, phase: str) -> dict[str, Any]:
            self.asked.append(phase)
            return {"score": torch.tensor(2.5)} if phase == "valid" else {"loss": 7.0, "lr": 0.1}

    trainer = tiny_trainer(Extra)
    trainer.asked = []
    trainer.run(2, tiny_loader(16, 8), tiny_loader(8, 8, seed=1))
    assert trainer.asked == ["train", "valid", "train", "valid"]
    metrics = trainer.epoch_metrics
    assert metrics["valid/score"] == 2.5 and metrics["train/lr"] == 0.1
    assert metrics["train/loss"] == 7.0  # an extra replaces the step mean of the same name
    assert "valid/loss" in metrics and len(trainer.history) == 2


def test_fixed_signature_subclass_still_gets_addon_keywords_routed() -> None:
    class Fixed(TinyTrainer):
        def __init__(self, model: nn.Module, optimizer: Any = None, scheduler: Any = None, mode: str = "train") -> None:
            super().__init__(model, "cpu", mode, optimizer, scheduler, log_bar=False, handle_signals=False)

    model = nn.Linear(3, 1)
    trainer = Fixed.add_on(GradientClippingAddon)(model, torch.optim.SGD(model.parameters(), lr=0.1), max_norm=0.25)
    assert trainer.get_addon(GradientClippingAddon).max_norm == 0.25
    assert "_zt_captured_settings" not in vars(trainer)
    with pytest.raises(TypeError, match="max_nrom"):  # unknown keywords still reach the user's __init__
        Fixed.add_on(GradientClippingAddon)(model, torch.optim.SGD(model.parameters(), lr=0.1), max_nrom=0.25)


def test_a_keyword_the_subclass_names_itself_reaches_both() -> None:
    class Named(TinyTrainer):
        def __init__(self, *args: Any, max_norm: float = 0.0, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.own = max_norm

    trainer = tiny_trainer(Named.add_on(GradientClippingAddon), max_norm=0.5)
    assert trainer.own == 0.5 and trainer.get_addon(GradientClippingAddon).max_norm == 0.5


def test_trainers_satisfy_the_protocol_and_find_addons_by_class() -> None:
    trainer = tiny_trainer(TinyTrainer.add_on(GradientClippingAddon(max_norm=1.0), Recorder))
    assert isinstance(trainer, TrainerView)
    clipper = trainer.addon_of(GradientClippingAddon)
    assert clipper is trainer.get_addon("gradient_clipping")
    assert trainer.addon_of(Recorder) is trainer.get_addon(Recorder)
    assert trainer.addon_of(NonFiniteGuardAddon) is None


def test_set_nonfinite_loss_is_the_setter_add_ons_use() -> None:
    trainer = tiny_trainer(TinyTrainer.add_on(NonFiniteGuardAddon(policy="skip")))
    assert trainer.nonfinite_loss == "ignore"
    with pytest.raises(AttributeError):
        trainer.nonfinite_loss = "raise"  # type: ignore[misc]
    with pytest.raises(TrainerConfigError, match="nonfinite_loss must be one of"):
        trainer.set_nonfinite_loss("skip")  # type: ignore[arg-type]


def test_idle_hooks_are_left_out_of_dispatch() -> None:
    fp32 = tiny_trainer(TinyTrainer.add_on(PrecisionMixerAddon(precision="fp32")))
    assert fp32._fire_before_step is None and fp32._fire_batch_end is None  # nothing per step
    fp16 = tiny_trainer(TinyTrainer.add_on(PrecisionMixerAddon(precision="fp16")))
    assert fp16._dispatch.subscribers(Event.BEFORE_OPTIMIZER_STEP) == (fp16.get_addon("precision_mixer"),)


class _CountingStrategy:
    """A strategy mixin counting its own calls, idle as its add-on says."""

    def backward(self, loss: torch.Tensor) -> None:
        self.addon_of(_Counted).calls["backward"] += 1  # type: ignore[attr-defined]
        super().backward(loss)  # type: ignore[misc]

    def optimizer_step(self) -> None:
        self.addon_of(_Counted).calls["optimizer_step"] += 1  # type: ignore[attr-defined]
        super().optimizer_step()  # type: ignore[misc]


class _Counted(AddOn):
    trainer_mixin = _CountingStrategy

    def __init__(self, *, idle: tuple[str, ...] = ()) -> None:
        self.idle = frozenset(idle)
        self.calls = {"backward": 0, "optimizer_step": 0}

    def idle_overrides(self) -> frozenset[str]:
        return self.idle


def test_idle_strategy_overrides_are_called_past_for_the_run() -> None:
    busy = tiny_trainer(TinyTrainer.add_on(_Counted()))
    busy.run(1, tiny_loader(16, 8))
    assert busy.get_addon("_Counted").calls == {"backward": 2, "optimizer_step": 2}

    idle = tiny_trainer(TinyTrainer.add_on(_Counted(idle=("backward",))))
    before = [p.detach().clone() for p in idle.model.parameters()]
    idle.run(1, tiny_loader(16, 8))
    assert idle.get_addon("_Counted").calls == {"backward": 0, "optimizer_step": 2}
    assert idle.progress_checker.step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, idle.model.parameters()))  # it still trained
    assert "backward" not in vars(idle)  # bound for the run only: no bound method left on the trainer
    idle.backward(idle.train_step(next(iter(tiny_loader(8, 8))))["loss"])  # outside run(): the full chain
    assert idle.get_addon("_Counted").calls["backward"] == 1


def test_an_outer_busy_override_still_reaches_an_idle_inner_one() -> None:
    class Outer(AddOn):
        name = "outer"
        runs_before = ("_Counted",)

        class trainer_mixin:  # noqa: N801 - a mixin class
            def backward(self, loss: torch.Tensor) -> None:
                super().backward(loss)  # type: ignore[misc]

    trainer = tiny_trainer(TinyTrainer.add_on(Outer, _Counted(idle=("backward",))))
    assert [k.__qualname__ for k in type(trainer).__mro__ if "backward" in vars(k)][:2] == [
        "test_an_outer_busy_override_still_reaches_an_idle_inner_one.<locals>.Outer.trainer_mixin",
        "_CountingStrategy",
    ]
    trainer.run(1, tiny_loader(16, 8))
    assert trainer.get_addon("_Counted").calls["backward"] == 2  # reached through super(): still correct


def test_precision_fp32_adds_no_strategy_call_per_step() -> None:
    from zae_trainer.dispatch import active_overrides

    fp32 = tiny_trainer(TinyTrainer.add_on(PrecisionMixerAddon(precision="fp32")))
    assert set(active_overrides(type(fp32), fp32.addon_instances)) == {"autocast", "backward", "optimizer_step"}
    bf16 = tiny_trainer(TinyTrainer.add_on(PrecisionMixerAddon(precision="bf16")))
    assert set(active_overrides(type(bf16), bf16.addon_instances)) == {"backward", "optimizer_step"}
    fp16 = tiny_trainer(TinyTrainer.add_on(PrecisionMixerAddon(precision="fp16")))
    assert active_overrides(type(fp16), fp16.addon_instances) == {}

    class Dtypes(TinyTrainer):
        seen: list[torch.dtype] = []

        def train_step(self, batch: Any) -> dict[str, Any]:
            out = super().train_step(batch)
            self.seen.append(self.model(batch[0]).dtype)
            return out

    trainer = tiny_trainer(Dtypes.add_on(PrecisionMixerAddon(precision="bf16")))
    trainer.run(1, tiny_loader(16, 8))
    assert Dtypes.seen == [torch.bfloat16, torch.bfloat16]  # autocast is still entered


def test_describe_prints_the_resolved_hook_order(capsys: pytest.CaptureFixture[str]) -> None:
    built = TinyTrainer.add_on(GradientClippingAddon(max_norm=1.0), PrecisionMixerAddon, NonFiniteGuardAddon)
    text = built.describe()
    assert capsys.readouterr().out == text + "\n"
    lines = text.splitlines()
    assert lines[0] == "TinyTrainer[nonfinite_guard, precision_mixer, gradient_clipping]"
    hooks = {line.split()[0]: line.split(None, 1)[1] for line in lines if line.startswith("    ") and line.split()[0].isupper()}
    assert hooks["BEFORE_OPTIMIZER_STEP"] == "nonfinite_guard -> precision_mixer -> gradient_clipping"
    assert hooks["TRAIN_BATCH_END"] == "precision_mixer -> nonfinite_guard  [reverse of declared order]"
    assert hooks["LOG"] == "-"
    assert "    backward: nonfinite_guard -> precision_mixer -> Trainer" in lines
    assert Trainer.describe(io.StringIO()).splitlines()[1] == "  add-ons: (none)"


# -- best: one rule ------------------------------------------------------------------------------


def test_ties_keep_the_earliest_epoch_as_best() -> None:
    assert is_better(1.0, None, "min") and not is_better(1.0, 1.0, "min") and not is_better(1.0, 1.0, "max")

    class Scripted(TinyTrainer):
        scores = [0.5, 0.8, 0.8, 0.7]

        def phase_end_metrics(self, phase: str) -> dict[str, float]:
            return {"acc": self.scores[self.progress_checker.epoch]} if phase == "valid" else {}

    trainer = tiny_trainer(Scripted, monitor="valid/acc", monitor_mode="max")
    trainer.run(4, tiny_loader(8, 8), tiny_loader(8, 8, seed=1))
    assert trainer.best == {"metric": "valid/acc", "value": 0.8, "epoch": 2}


# -- a misspelt monitor (issue 12, item 6) ------------------------------------------------------


class _WithAcc(TinyTrainer):
    def test_step(self, batch: Any) -> dict[str, Any]:
        out = super().test_step(batch)
        out["acc"] = torch.tensor(0.5)
        return out


def test_a_misspelt_monitor_fails_at_the_first_epoch_end_naming_the_metrics() -> None:
    trainer = tiny_trainer(_WithAcc.add_on(Recorder), monitor="valid/accuracy", monitor_mode="max")
    with pytest.raises(TrainerConfigError) as info:
        trainer.run(3, tiny_loader(16, 8), tiny_loader(8, 8, seed=1))
    message = str(info.value)
    assert "monitor='valid/accuracy' is not a metric of this run" in message
    assert "Did you mean 'valid/acc'" in message and "['train/loss', 'valid/acc', 'valid/loss']" in message
    assert trainer.progress_checker.epoch == 0  # the first epoch end, before EPOCH_END fired
    assert trainer.get_addon(Recorder).trace[-2:] == ["EXCEPTION e0 s2 TrainerConfigError", "RUN_END e0 s2"]


def test_a_validation_monitor_is_judged_at_the_first_epoch_that_validates() -> None:
    trainer = tiny_trainer(_WithAcc, monitor="valid/acc", valid_every_n_epochs=2)
    trainer.run(3, tiny_loader(8, 8), tiny_loader(8, 8, seed=1))  # epoch 1 has no valid/ metrics: not an error
    assert trainer.best["metric"] == "valid/acc" and trainer.best["epoch"] == 2
    late = tiny_trainer(_WithAcc, monitor="valid/accuracy", valid_every_n_epochs=2)
    with pytest.raises(TrainerConfigError, match="valid/accuracy"):
        late.run(3, tiny_loader(8, 8), tiny_loader(8, 8, seed=1))
    assert late.progress_checker.epoch == 1  # failed at the end of epoch 2, the first that validated


def test_a_validation_monitor_without_a_validation_loader_fails_at_once() -> None:
    trainer = tiny_trainer(monitor="valid/loss")
    with pytest.raises(TrainerConfigError, match="no valid_loader"):
        trainer.run(2, tiny_loader(8, 8))


# -- signals -------------------------------------------------------------------------------------


def test_stop_signals_records_the_signal_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(enabled=True) as signals:
        assert signal.getsignal(signal.SIGTERM) != before
        signal.raise_signal(signal.SIGTERM)
        assert signals.pending == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before and signals.pending is None
    with StopSignals(enabled=False):
        assert signal.getsignal(signal.SIGTERM) == before
