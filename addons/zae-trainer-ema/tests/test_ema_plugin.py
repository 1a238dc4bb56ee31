"""The example plugin: EMA math (AveragedModel, buffers included), discovery by name, checkpoints,
and the zae_trainer conformance suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from zae_trainer import Trainer
from zae_trainer.addons import StateManagerAddon, available
from zae_trainer.testing import TinyRegressionTrainer, check_addon, tiny_loader, tiny_trainer
from zae_trainer_ema import EMAAddon


def test_found_by_name_through_its_entry_point() -> None:
    assert Trainer.add_on("ema").addons == (EMAAddon,)
    listing = available()["ema"]
    assert listing["distribution"] == "zae-trainer-ema" and listing["settings"]["decay"] == 0.999


def _replay(loader: Any, lr: float = 0.05) -> list[list[torch.Tensor]]:
    """The same training as tiny_trainer's, as a raw PyTorch loop: weights after each step."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    snapshots = [[p.detach().clone() for p in model.parameters()]]
    for x, y in loader:
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        snapshots.append([p.detach().clone() for p in model.parameters()])
    return snapshots


def test_averaged_weights_follow_the_ema_formula_from_the_initial_weights() -> None:
    decay = 0.5
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(EMAAddon(decay=decay)))
    loader = tiny_loader(24, 8)  # 3 steps
    trainer.run(1, loader)
    snapshots = _replay(loader)
    expected = snapshots[0]
    for live in snapshots[1:]:
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, live)]
    state = trainer.ema_state_dict()
    torch.testing.assert_close(state["weight"], expected[0])
    torch.testing.assert_close(state["bias"], expected[1])
    assert trainer.get_addon(EMAAddon).updates == 3
    assert torch.equal(trainer.model.weight, snapshots[-1][0])  # training itself untouched
    averaged = trainer.ema_model()
    assert isinstance(averaged, AveragedModel) and int(averaged.n_averaged) == 4  # copy + 3 updates


def test_warmup_ramps_the_decay() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(EMAAddon(decay=0.99, warmup=True)))
    loader = tiny_loader(24, 8)
    trainer.run(1, loader)
    snapshots = _replay(loader)
    expected = snapshots[0]
    for n, live in enumerate(snapshots[1:]):
        d = min(0.99, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p for e, p in zip(expected, live)]
    torch.testing.assert_close(trainer.ema_state_dict()["weight"], expected[0])


class BatchNormTrainer(Trainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model(x), y)}

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self.train_step(batch)


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))


def test_buffers_are_averaged_too() -> None:
    decay = 0.5
    loader = tiny_loader(24, 8)  # 3 steps
    replay = _bn_model()
    optimizer = torch.optim.SGD(replay.parameters(), lr=0.05)
    expected = replay[1].running_mean.clone()
    for x, y in loader:  # the live running mean after each step, averaged by hand
        nn.functional.mse_loss(replay(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        expected = decay * expected + (1 - decay) * replay[1].running_mean

    model = _bn_model()
    trainer = BatchNormTrainer.add_on(EMAAddon(decay=decay))(
        model, "cpu", optimizer=torch.optim.SGD(model.parameters(), lr=0.05), log_bar=False
    )
    trainer.run(1, loader)
    torch.testing.assert_close(trainer.ema_state_dict()["1.running_mean"], expected)
    assert not torch.allclose(expected, model[1].running_mean)  # an average, not a copy of the live buffer


def test_validation_can_use_the_averaged_weights_and_restores_the_live_ones() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(EMAAddon(decay=0.9, validate_with_ema=True)))
    trainer.run(2, tiny_loader(), tiny_loader(16, seed=5))
    plain = tiny_trainer(TinyRegressionTrainer)
    plain.run(2, tiny_loader(), tiny_loader(16, seed=5))
    assert torch.equal(trainer.model.weight, plain.model.weight)  # training untouched
    assert trainer.epoch_metrics["valid/loss"] != plain.epoch_metrics["valid/loss"]  # validated on EMA


@pytest.mark.parametrize("save_format", ["ckpt", "safetensors"])
def test_the_average_is_checkpointed_and_restored(tmp_path: Path, save_format: str) -> None:
    Built = TinyRegressionTrainer.add_on(EMAAddon(decay=0.8), StateManagerAddon)
    trainer = tiny_trainer(Built, save_path=tmp_path / "ckpt", save_format=save_format)
    trainer.run(2, tiny_loader())
    path = trainer.save_state()
    fresh = tiny_trainer(Built, seed=3, save_path=tmp_path / "other", save_format=save_format)
    fresh.load_state(path)
    assert fresh.get_addon(EMAAddon).updates == trainer.get_addon(EMAAddon).updates == 12
    for key, value in trainer.ema_state_dict().items():
        torch.testing.assert_close(fresh.ema_state_dict()[key], value, rtol=0, atol=0)
    assert int(fresh.ema_model().n_averaged) == 13


def test_a_version_01_state_still_loads() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(EMAAddon(decay=0.9)))
    old = {"updates": 5, "shadow": {"0": torch.full((1, 3), 2.0), "1": torch.full((1,), -1.0)}}
    trainer.get_addon(EMAAddon).load_state_dict(old)
    state = trainer.ema_state_dict()
    assert torch.equal(state["weight"], old["shadow"]["0"]) and torch.equal(state["bias"], old["shadow"]["1"])


def test_bad_decay_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        EMAAddon(decay=1.5)


def test_ema_passes_the_conformance_suite(tmp_path: Path) -> None:
    report = check_addon(EMAAddon, {"decay": 0.9, "warmup": True}, workdir=tmp_path)
    assert report["state"] == ["ckpt", "safetensors"]
    assert report["sync"] == 0
    assert "state_manager" in report["compose"]
