"""trainer.test(loader, weights=...): evaluates, returns test/* metrics, logs them, changes no training state."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from zae_trainer.addons import LocalLoggerAddon, StateManagerAddon
from zae_trainer.errors import TrainerConfigError

from core_helpers import Recorder, TinyTrainer, tiny_loader, tiny_trainer


def hand_mse(model: nn.Module, loader: Any) -> float:
    """The test loss computed by hand: batch MSEs weighted by batch size."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            total += float(nn.functional.mse_loss(model(x), y)) * len(x)
            count += len(x)
    return total / count


def test_metrics_equal_a_hand_computed_evaluation_and_training_state_is_unchanged(tmp_path: Any) -> None:
    built = TinyTrainer.add_on(Recorder, LocalLoggerAddon)
    trainer = tiny_trainer(built, log_dir=str(tmp_path / "logs"))
    trainer.run(2, tiny_loader(), tiny_loader(n=12, seed=1))
    history = [dict(h) for h in trainer.history]
    progress = trainer.progress_checker.state_dict()
    epoch_metrics, best, summary = dict(trainer.epoch_metrics), dict(trainer.best), trainer.summary
    summary_json = (tmp_path / "logs" / "summary.json").read_text()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    optimizer_state = trainer.optimizer.state_dict()
    recorder = trainer.get_addon(Recorder)
    recorder.trace.clear()

    test_loader = tiny_loader(n=13, batch_size=5, seed=7)  # uneven last batch: weighting matters
    metrics = trainer.test(test_loader)

    assert set(metrics) == {"test/loss"}
    assert metrics["test/loss"] == pytest.approx(hand_mse(trainer.model, test_loader), rel=1e-6)
    assert trainer.history == history
    assert trainer.progress_checker.state_dict() == progress
    assert trainer.epoch_metrics == epoch_metrics and trainer.best == best
    assert trainer.summary is summary
    assert (tmp_path / "logs" / "summary.json").read_text() == summary_json
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.optimizer.state_dict()["state"].keys() == optimizer_state["state"].keys()
    # evaluation-batch events, then TEST_END; no epoch/run events: nothing for checkpoints or history
    assert recorder.trace == ["VALID_BATCH_END e2 s6"] * 3 + ["TEST_END e2 s6"]
    assert trainer.phase == "train" and trainer.model.training
    logged = json.loads((tmp_path / "logs" / "test.json").read_text())
    assert logged == [{"step": 6, "epoch": 2, "metrics": metrics}]

    # training goes on as if test() had not been called: its test accumulator leaves no trace
    trainer.run(1, tiny_loader(), tiny_loader(n=12, seed=1))
    assert not any(k.startswith("test/") for k in trainer.epoch_metrics)
    assert len(trainer.history) == 3


def test_best_and_last_weights_give_the_values_of_those_epochs(tmp_path: Any) -> None:
    built = TinyTrainer.add_on(StateManagerAddon)
    # "best" = highest valid/loss: the loss falls every epoch, so the best epoch is the first, not the last
    trainer = tiny_trainer(
        built, save_path=str(tmp_path / "ckpt"), keep_top_k=1, monitor="valid/loss", monitor_mode="max"
    )
    valid = tiny_loader(n=12, seed=1)
    per_epoch: list[dict[str, torch.Tensor]] = []

    for _ in range(3):
        trainer.run(1, tiny_loader(), valid)
        per_epoch.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert trainer.best["epoch"] == 1, trainer.history  # the premise of the test
    last_weights = per_epoch[-1]

    reference = nn.Linear(3, 1)
    reference.load_state_dict(per_epoch[0])
    best_expected = hand_mse(reference, valid)
    reference.load_state_dict(last_weights)
    last_expected = hand_mse(reference, valid)

    best = trainer.test(valid, weights="best")
    last = trainer.test(valid, weights="last")
    assert best["test/loss"] == pytest.approx(trainer.history[0]["valid/loss"], rel=1e-6)
    assert best["test/loss"] == pytest.approx(best_expected, rel=1e-6)
    assert last["test/loss"] == pytest.approx(last_expected, rel=1e-6)
    assert last["test/loss"] == pytest.approx(trainer.history[-1]["valid/loss"], rel=1e-6)
    assert best["test/loss"] > last["test/loss"]
    # the weights are put back after evaluating the best ones
    assert all(torch.equal(v, last_weights[k]) for k, v in trainer.model.state_dict().items())

    path = trainer.get_addon("state_manager").export_weights(str(tmp_path / "best.safetensors"), "best")
    assert trainer.test(valid, weights=path)["test/loss"] == pytest.approx(best_expected, rel=1e-6)


def test_checkpointed_weights_need_the_state_manager() -> None:
    trainer = tiny_trainer()
    with pytest.raises(TrainerConfigError, match="StateManagerAddon"):
        trainer.test(tiny_loader(), weights="best")


def test_test_phase_extension_points_see_phase_test() -> None:
    seen: list[str] = []

    class Extras(TinyTrainer):
        def phase_end_metrics(self, phase: str) -> dict[str, float]:
            seen.append(phase)
            return {"answer": 42.0} if phase == "test" else {}

    trainer = tiny_trainer(Extras)
    metrics = trainer.test(tiny_loader())
    assert metrics["test/answer"] == 42.0 and seen == ["test"]
    assert trainer.history == [] and trainer.progress_checker.step == 0


def test_test_needs_no_optimizer_and_works_on_a_test_mode_trainer() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    trainer = TinyTrainer(model, "cpu", "test", log_bar=False, handle_signals=False)
    loader = tiny_loader()
    assert trainer.test(loader)["test/loss"] == pytest.approx(hand_mse(model, loader), rel=1e-6)
