"""The example plugin: EMA math, discovery by name, and the zae_trainer conformance suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zae_trainer import Trainer
from zae_trainer.addons import available
from zae_trainer.testing import TinyRegressionTrainer, check_addon, tiny_loader, tiny_trainer
from zae_trainer_ema import EMAAddon


def test_found_by_name_through_its_entry_point() -> None:
    assert Trainer.add_on("ema").addons == (EMAAddon,)
    listing = available()["ema"]
    assert listing["distribution"] == "zae-trainer-ema" and listing["settings"]["decay"] == 0.999


def test_shadow_weights_follow_the_ema_formula() -> None:
    decay = 0.5
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(EMAAddon(decay=decay)))
    loader = tiny_loader(24, 8)  # 3 steps
    trainer.run(1, loader)
    # recompute by hand from a replay of the same training without EMA
    replay = tiny_trainer(TinyRegressionTrainer)
    expected = [p.detach().clone() for p in replay.model.parameters()]
    for batch in loader:
        replay.run_batch(batch)
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, replay.model.parameters())]
    state = trainer.ema_state_dict()
    assert torch.allclose(state["weight"], expected[0]) and torch.allclose(state["bias"], expected[1])
    assert trainer.get_addon(EMAAddon).updates == 3
    assert torch.equal(trainer.model.weight, replay.model.weight)


def test_validation_can_use_the_averaged_weights_and_restores_the_live_ones() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(EMAAddon(decay=0.9, validate_with_ema=True)))
    trainer.run(2, tiny_loader(), tiny_loader(16, seed=5))
    plain = tiny_trainer(TinyRegressionTrainer)
    plain.run(2, tiny_loader(), tiny_loader(16, seed=5))
    assert torch.equal(trainer.model.weight, plain.model.weight)  # training untouched
    assert trainer.epoch_metrics["valid/loss"] != plain.epoch_metrics["valid/loss"]  # validated on EMA


def test_bad_decay_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        EMAAddon(decay=1.5)


def test_ema_passes_the_conformance_suite(tmp_path: Path) -> None:
    report = check_addon(EMAAddon, {"decay": 0.9, "warmup": True}, workdir=tmp_path)
    assert report["state"] == ["ckpt", "safetensors"]
    assert report["sync"] == 0
    assert "state_manager" in report["compose"]
