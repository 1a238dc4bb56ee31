"""zae_trainer.compat.Trainer, used the way zae-engine users write code.

Only the import prefix differs from zae-engine: ``zae_engine.trainer`` -> ``zae_trainer.compat``.
Subclasses with fixed constructors, ``metric_on_epoch_end`` overrides and instance
assignments, ``logging`` overrides in ``AddOnBase`` add-ons, ``print_log``, ``log_reset``,
``check_better`` / ``weight_buffer`` / ``apply_weights``, ``toggle`` and ``inference``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zae_trainer.compat import ProgressChecker, Trainer  # was: from zae_engine.trainer import ...
from zae_trainer.compat.addons import AddOnBase, PrecisionMixerAddon  # was: zae_engine.trainer.addons
from zae_trainer.errors import TrainerConfigError


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x.sum(1) > 0).long())


def _loader(n: int = 24, batch: int = 8, seed: int = 0) -> DataLoader:
    return DataLoader(_data(n, seed), batch_size=batch)


class Classifier(Trainer):
    """A zae-engine-style trainer: accuracy as an extra output, argmax as "output"."""

    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        logits = self.model(x)
        acc = (logits.argmax(1) == y).float().mean()
        return {"loss": nn.functional.cross_entropy(logits, y), "acc": acc}

    def test_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        logits = self.model(x)
        return {"loss": nn.functional.cross_entropy(logits, y), "output": logits.argmax(1), "label": y}


class FixedInit(Classifier):
    """zae-engine's own test_web_logger DummyTrainer signature: no **kwargs at all."""

    def __init__(self, model: nn.Module, optimizer: Any = None, scheduler: Any = None, mode: str = "train") -> None:
        super().__init__(model, torch.device("cpu"), mode, optimizer, scheduler, log_bar=False, handle_signals=False)


def _parts(lr: float = 0.1) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def _trainer(cls: type = Classifier, **kwargs: Any) -> Any:
    model, opt = _parts()
    kwargs.setdefault("log_bar", False)
    kwargs.setdefault("handle_signals", False)
    return cls(model, torch.device("cpu"), "train", opt, None, **kwargs)


def test_metric_on_epoch_end_override_sees_complete_cpu_logs_and_reaches_metrics() -> None:
    calls: list[tuple[str, int, str]] = []

    class WithAccuracy(Classifier):
        def metric_on_epoch_end(self) -> dict[str, float]:
            if self.mode == "train":
                calls.append(("train", len(self.log_train["loss"]), self.log_train["loss"][0].device.type))
                return {"mean_acc": float(torch.stack(self.log_train["acc"]).mean())}
            outputs, labels = torch.cat(self.log_test["output"]), torch.cat(self.log_test["label"])
            calls.append(("test", len(outputs), outputs.device.type))
            return {"val_accuracy": (outputs == labels).float().mean().item()}

    trainer = _trainer(WithAccuracy)
    trainer.run(2, _loader(24), _loader(16, seed=1))
    # once per phase per epoch, with every batch of the phase (3 train batches, 16 valid samples)
    assert calls == [("train", 3, "cpu"), ("test", 16, "cpu")] * 2
    assert set(trainer.train_metrics) == {"mean_acc"} and set(trainer.test_metrics) == {"val_accuracy"}
    # numeric values become epoch metrics, so loggers, checkpoints and monitor= see them
    assert trainer.epoch_metrics["valid/val_accuracy"] == pytest.approx(trainer.test_metrics["val_accuracy"])
    assert trainer.epoch_metrics["train/mean_acc"] == pytest.approx(trainer.train_metrics["mean_acc"])


def test_metric_on_epoch_end_assigned_on_the_instance_is_used() -> None:
    trainer = _trainer()
    trainer.metric_on_epoch_end = lambda: {"asd": 1}  # zae-engine's own test_run does this
    trainer.run(1, _loader())
    assert trainer.train_metrics == {"asd": 1}
    assert trainer.epoch_metrics["train/asd"] == 1.0


def test_print_log_is_called_at_each_phase_end_and_returns_zae_engines_dict() -> None:
    reports: list[dict[str, str]] = []

    class Spy(Classifier):
        def print_log(self, cur_batch: int, num_batch: int) -> dict[str, str]:
            report = super().print_log(cur_batch, num_batch)
            reports.append(report)
            return report

    trainer = _trainer(Spy)
    trainer.run(1, _loader(24), _loader(16, seed=1))
    assert [r["Batch"] for r in reports] == ["3/3", "2/2"]
    train_losses = [float(v) for v in trainer.log_train["loss"]]
    assert float(reports[0]["loss"]) == pytest.approx(sum(train_losses) / 3, abs=1e-6)
    assert reports[0]["LR"] == "1.000e-01" and "output" not in reports[1]


class CountingLogger(AddOnBase):
    """zae-engine's AddOnBase docstring example: a custom ``logging`` override with its own setting."""

    @classmethod
    def apply(cls, base_cls: type) -> type:
        class TrainerWithCustomLogger(base_cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, custom_param: str | None = None, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.custom_param = custom_param
                self.seen: list[tuple[str, float]] = []

            def logging(self, step_dict: dict[str, Any]) -> None:
                super().logging(step_dict)
                self.seen.append((self.mode, float(step_dict["loss"].detach())))

        return TrainerWithCustomLogger


def test_a_logging_override_is_called_per_batch_in_training_and_validation() -> None:
    trainer = _trainer(Classifier.add_on(CountingLogger), custom_param="log everything")
    trainer.run(2, _loader(24), _loader(16, seed=1))
    assert trainer.custom_param == "log everything"
    assert [mode for mode, _ in trainer.seen] == (["train"] * 3 + ["test"] * 2) * 2
    # the values are the step's own: the last epoch's validation losses are log_test's
    assert [v for _, v in trainer.seen[-2:]] == pytest.approx([float(v) for v in trainer.log_test["loss"]])


def test_mode_is_test_during_validation_and_toggle_switches_run_to_evaluation() -> None:
    modes: list[tuple[str, str]] = []

    class Recording(Classifier):
        def test_step(self, batch: Any) -> dict[str, Any]:
            modes.append((self.mode, self.phase))
            return super().test_step(batch)

    trainer = _trainer(Recording)
    trainer.run(1, _loader(), _loader(8, seed=1))
    assert modes == [("test", "valid")] and trainer.mode == "train"
    before = trainer.model.weight.detach().clone()
    trainer.toggle()
    assert trainer.mode == "test"
    trainer.run(1, _loader(16, seed=2))  # evaluates: no update, log_test holds this pass
    assert torch.equal(trainer.model.weight, before) and len(trainer.log_test["loss"]) == 2
    trainer.toggle("train")
    assert trainer.mode == "train"


def test_log_reset_with_epoch_end_clears_logs_and_epoch_metrics() -> None:
    trainer = _trainer()
    trainer.metric_on_epoch_end = lambda: {"m": 2.0}
    trainer.run(1, _loader(), _loader(8, seed=1))
    assert trainer.log_train["loss"] and trainer.test_metrics == {"m": 2.0}
    trainer.log_reset()
    assert not trainer.log_train and not trainer.log_test and trainer.test_metrics == {"m": 2.0}
    trainer.log_reset(epoch_end=True)
    assert trainer.train_metrics == {} and trainer.test_metrics == {}


def test_construction_without_model_or_optimizer_then_a_clear_error_at_run() -> None:
    built = Classifier.add_on(CountingLogger)
    trainer = built(model=None, device=torch.device("cpu"), mode="train", optimizer=None, scheduler=None)
    assert trainer.model is None and trainer.custom_param is None
    with pytest.raises(TrainerConfigError, match="model=None"):
        trainer.run(1, _loader())
    model = nn.Linear(4, 2)
    no_optimizer = Classifier(model, torch.device("cpu"), "train", None, None, log_bar=False)
    with pytest.raises(TrainerConfigError, match="optimizer=None"):
        no_optimizer.run(1, _loader())
    no_optimizer.toggle("test")
    no_optimizer.run(1, _loader())  # evaluating needs no optimizer
    assert len(no_optimizer.log_test["loss"]) == 3


def test_check_better_keeps_a_copy_and_apply_weights_restores_the_best(tmp_path: Path) -> None:
    trainer = _trainer()
    trainer.run(1, _loader(), _loader(8, seed=1))
    assert trainer.weight_buffer["epoch"] == [0]  # zae-engine's 0-based epoch index
    best = {k: v.clone() for k, v in trainer.weight_buffer["weight"][0].items()}
    assert torch.equal(best["weight"], trainer.model.weight)
    assert trainer.loss_buffer == pytest.approx(trainer.epoch_metrics["valid/loss"])
    with torch.no_grad():
        trainer.model.weight.add_(1.0)  # zae-engine stored references: its "best" would follow this
    assert torch.equal(trainer.weight_buffer["weight"][0]["weight"], best["weight"])
    assert trainer.check_better(cur_epoch=5, cur_loss=trainer.loss_buffer + 1.0) is False
    trainer.apply_weights()
    assert torch.equal(trainer.model.weight, best["weight"])
    path = tmp_path / "w.pth"
    trainer.save_model(str(path))
    with torch.no_grad():
        trainer.model.weight.zero_()
    trainer.apply_weights(str(path))
    assert torch.equal(trainer.model.weight, best["weight"])
    with pytest.raises(FileNotFoundError, match=r"no file .*missing\.pth.*w\.pth"):
        trainer.apply_weights(str(tmp_path / "missing.pth"))


def test_inference_returns_outputs_and_leaves_mode_and_metrics() -> None:
    trainer = _trainer()
    trainer.metric_on_epoch_end = lambda: {"m": 1.0}
    trainer.run(1, _loader())
    metrics = (dict(trainer.train_metrics), dict(trainer.test_metrics))
    results = trainer.inference(_loader(20, batch=8, seed=3))
    assert [r.shape for r in results] == [(8,), (8,), (4,)] and all(r.device.type == "cpu" for r in results)
    assert len(trainer.log_test["output"]) == 3 and trainer.mode == "train"
    assert (trainer.train_metrics, trainer.test_metrics) == metrics


def test_get_step_counts_optimizer_steps_not_validation_batches() -> None:
    trainer = _trainer()
    trainer.run(2, _loader(24), _loader(16, seed=1))
    # zae-engine counted every batch (train + validation): it would say 2*(3+2)+1 = 11
    assert trainer.progress_checker.get_step() == 2 * 3 + 1
    assert trainer.progress_checker.get_epoch() == 3
    assert isinstance(trainer.progress_checker, ProgressChecker)
    assert trainer.batch_size == 8 and trainer.valid_batch_size == 8


def test_gradient_clip_is_kept_under_mixed_precision_in_direct_run_batch_calls() -> None:
    def update_norms(**kwargs: Any) -> list[float]:
        trainer = _trainer(Classifier.add_on(PrecisionMixerAddon), precision="bf16", **kwargs)
        norms: list[float] = []
        params = list(trainer.model.parameters())
        previous = [p.detach().clone() for p in params]
        for batch in _loader(24):
            trainer.run_batch(batch)
            now = [p.detach().clone() for p in params]
            norms.append(float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(now, previous)))))
            previous = now
        return norms

    assert max(update_norms(gradient_clip=1e-3)) <= 0.1 * 1e-3 * 1.001  # lr * max_norm
    assert min(update_norms()) > 0.1 * 1e-3 * 10  # without clipping the updates are far larger


def test_gradient_clip_in_the_loop_bounds_every_update() -> None:
    class Tap(Classifier):
        def train_step(self, batch: Any) -> dict[str, Any]:
            self.snapshots.append([p.detach().clone() for p in self.model.parameters()])
            return super().train_step(batch)

    model, opt = _parts()
    trainer = Tap.add_on(PrecisionMixerAddon)(model, "cpu", "train", opt, None, log_bar=False, handle_signals=False, gradient_clip=1e-3,
                    precision="bf16")
    trainer.snapshots = []
    trainer.run(1, _loader(24))
    trainer.snapshots.append([p.detach().clone() for p in model.parameters()])
    steps = [
        float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before))))
        for before, after in zip(trainer.snapshots, trainer.snapshots[1:])
    ]
    assert len(steps) == 3 and max(steps) <= 0.1 * 1e-3 * 1.001


def test_precision_mixer_runs_on_a_cpu_with_zae_engines_attributes() -> None:
    trainer = _trainer(Classifier.add_on(PrecisionMixerAddon), precision="auto")
    assert trainer.precision == ["fp32"] and trainer.scaler is None  # zae-engine raised ValueError on a CPU
    trainer.run(1, _loader())
    fp16 = _trainer(Classifier.add_on(PrecisionMixerAddon), precision=["fp16"])
    assert fp16.precision == ["fp16"] and fp16.scaler is not None


def test_settings_reach_add_ons_past_a_fixed_constructor() -> None:
    trainer = FixedInit.add_on(CountingLogger)(nn.Linear(4, 2), custom_param="x")
    assert trainer.custom_param == "x" and trainer.mode == "train" and trainer.optimizer is None


def test_importing_the_core_does_not_import_the_compat_layer() -> None:
    code = (
        "import sys, zae_trainer; from zae_trainer.addons import StateManagerAddon; "
        "print(any(m.startswith('zae_trainer.compat') for m in sys.modules)); "
        "print(hasattr(zae_trainer.Trainer, 'log_train'), hasattr(zae_trainer.Trainer, 'check_better'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "False"]


def test_a_trainer_built_in_test_mode_evaluates_with_the_core_loop() -> None:
    model, _ = _parts()
    before = model.weight.detach().clone()
    trainer = Classifier(model, torch.device("cpu"), "test", None, None, log_bar=False, handle_signals=False)
    trainer.metric_on_epoch_end = lambda: {"n": len(trainer.log_test["output"])}
    trainer.run(1, _loader(20, batch=8))
    assert trainer.mode == "test" and trainer.run_kind == "test"
    assert torch.equal(model.weight, before) and trainer.progress_checker.get_step() == 1
    assert len(trainer.log_test["loss"]) == 3 and trainer.log_train == {}
    assert trainer.test_metrics == {"n": 3} and trainer.epoch_metrics["test/n"] == 3.0


def test_logged_scalars_move_to_the_host_in_increments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every _HOST_EVERY batches and at phase end, only what was logged since the last move."""
    import zae_trainer.compat._trainer as layer

    calls: list[tuple[int, int]] = []
    real = layer._to_host

    def spy(values: list[Any], start: int = 0) -> None:
        calls.append((len(values), start))
        real(values, start)

    monkeypatch.setattr(layer, "_HOST_EVERY", 2)
    monkeypatch.setattr(layer, "_to_host", spy)
    trainer = _trainer()
    trainer.run(1, _loader(40))  # 5 batches: moves after batches 2 and 4, then at phase end
    # each move covers log_train["loss"], log_train["acc"] and the loss history: (length, start)
    assert calls == [(2, 0)] * 3 + [(4, 2)] * 3 + [(5, 4)] * 3
    assert len(trainer.log_train["loss"]) == len(trainer.get_loss_history()) == 5
