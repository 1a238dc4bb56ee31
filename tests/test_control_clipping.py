"""GradientClippingAddon: hand-computed clipping, the recorded norm, and the unscale-then-clip order."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from zae_trainer import AddOn
from zae_trainer.addons.clipping import GradientClippingAddon
from zae_trainer.addons.precision import PrecisionMixerAddon
from zae_trainer.testing import TinyRegressionTrainer, check_addon, tiny_loader, tiny_trainer

LR = 0.05


def _one_batch() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(iter(tiny_loader(8)))]


def _hand_grads(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[nn.Linear, list[torch.Tensor]]:
    torch.manual_seed(0)  # tiny_trainer's model
    model = nn.Linear(3, 1)
    x, y = batch
    nn.functional.mse_loss(model(x), y).backward()
    return model, [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, "inf"])
def test_clipping_by_norm_matches_a_hand_computation(norm_type: Any) -> None:
    batch = _one_batch()
    model, grads = _hand_grads(batch[0])
    p = math.inf if norm_type == "inf" else norm_type
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, p) for g in grads]), p)
    max_norm = 0.1
    assert total > max_norm  # the case under test clips
    scale = max_norm / (total + 1e-6)
    expected = [w.detach() - LR * g * scale for w, g in zip(model.parameters(), grads)]

    trainer = tiny_trainer(
        TinyRegressionTrainer.add_on(GradientClippingAddon(max_norm=max_norm, norm_type=norm_type)), lr=LR
    )
    trainer.run(1, batch)
    for got, want in zip(trainer.model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)
    assert trainer.epoch_metrics["train/grad_norm"] == pytest.approx(float(total), rel=1e-6)


def test_clipping_by_value_matches_a_hand_computation() -> None:
    batch = _one_batch()
    model, grads = _hand_grads(batch[0])
    clip = 0.05
    assert any(g.abs().max() > clip for g in grads)
    expected = [w.detach() - LR * g.clamp(-clip, clip) for w, g in zip(model.parameters(), grads)]
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(GradientClippingAddon(clip_value=clip)), lr=LR)
    trainer.run(1, batch)
    for got, want in zip(trainer.model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert trainer.epoch_metrics["train/grad_norm"] == pytest.approx(float(total), rel=1e-6)


def test_grad_norm_is_logged_per_interval_and_averaged_per_epoch() -> None:
    class Logged(AddOn):
        def __init__(self) -> None:
            self.means: list[float] = []

        def on_log(self, trainer: Any, metrics: dict[str, float]) -> None:
            self.means.append(metrics["train/grad_norm"])

    trainer = tiny_trainer(TinyRegressionTrainer.add_on(GradientClippingAddon(max_norm=0.5), Logged), log_every_n_steps=2)
    trainer.run(1, tiny_loader(48))  # 6 steps: 3 log points of 2 steps each
    means = trainer.get_addon(Logged).means
    assert len(means) == 3 and all(v > 0 for v in means)
    assert trainer.epoch_metrics["train/grad_norm"] == pytest.approx(sum(means) / 3)


def test_error_if_nonfinite_is_passed_through() -> None:
    class Exploding(TinyRegressionTrainer):
        def train_step(self, batch: Any) -> dict[str, Any]:
            out = super().train_step(batch)
            return {"loss": out["loss"] * float("inf")}

    quiet = tiny_trainer(Exploding.add_on(GradientClippingAddon(max_norm=1.0)), nonfinite_loss="ignore")
    quiet.run(1, _one_batch())  # clip_grad_norm_'s default: no error
    strict = tiny_trainer(
        Exploding.add_on(GradientClippingAddon(max_norm=1.0, error_if_nonfinite=True)), nonfinite_loss="ignore"
    )
    with pytest.raises(Exception, match="non-finite"):
        strict.run(1, _one_batch())


def _spy_unscale_and_clip(monkeypatch: pytest.MonkeyPatch, trainer: Any) -> list[tuple[str, float]]:
    """Record, in order, each GradScaler.unscale_ and each clip with the gradient norm it saw."""
    calls: list[tuple[str, float]] = []
    scaler = trainer.get_addon("precision_mixer").scaler
    original_unscale = scaler.unscale_

    def unscale(optimizer: Any) -> None:
        calls.append(("unscale", math.nan))
        original_unscale(optimizer)

    scaler.unscale_ = unscale
    original_clip = torch.nn.utils.clip_grad_norm_

    def clip(parameters: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        params = list(parameters() if callable(parameters) else parameters)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        calls.append(("clip", float(norm)))
        return original_clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    return calls


def _true_grad_norm(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    _, grads = _hand_grads(batch)
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


@pytest.mark.parametrize("order", ["clip_first", "precision_first"])
def test_fp16_unscales_exactly_once_and_before_the_clip(monkeypatch: pytest.MonkeyPatch, order: str) -> None:
    addons = [PrecisionMixerAddon(precision="fp16", init_scale=1024.0), GradientClippingAddon(max_norm=0.1)]
    if order == "clip_first":
        addons.reverse()
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(*addons), lr=LR)
    calls = _spy_unscale_and_clip(monkeypatch, trainer)
    batch = _one_batch()
    trainer.run(1, batch)
    assert [c[0] for c in calls] == ["unscale", "clip"]
    # The clip saw true gradients (the fp16 forward rounds a little), not gradients x 65536.
    assert calls[1][1] == pytest.approx(_true_grad_norm(batch[0]), rel=2e-2)
    assert trainer.epoch_metrics["train/grad_norm"] == pytest.approx(calls[1][1], rel=1e-5)


def test_settings_are_checked_when_configured() -> None:
    with pytest.raises(ValueError, match="exactly one of max_norm"):
        GradientClippingAddon()
    with pytest.raises(ValueError, match="exactly one of max_norm"):
        GradientClippingAddon(max_norm=1.0, clip_value=1.0)
    with pytest.raises(ValueError, match="max_norm must be a finite number"):
        GradientClippingAddon(max_norm=-1.0)
    with pytest.raises(ValueError, match="norm_type"):
        GradientClippingAddon(max_norm=1.0, norm_type="two")


def test_the_core_has_no_clipping_keyword_of_its_own() -> None:
    # One way to clip: the add-on. zae-engine's gradient_clip= lives in zae_trainer.compat.
    with pytest.raises(TypeError, match="gradient_clip"):
        tiny_trainer(TinyRegressionTrainer.add_on(GradientClippingAddon(max_norm=1.0)), gradient_clip=1.0)


def test_last_norm_is_the_norm_before_clipping_of_the_latest_step() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(GradientClippingAddon(max_norm=0.1)), lr=LR)
    batch = _one_batch()
    trainer.run(1, batch)
    step, norm = trainer.get_addon("gradient_clipping").last_norm
    assert step == 1 and float(norm) == pytest.approx(_true_grad_norm(batch[0]), rel=1e-5)


def test_configured_by_keyword_and_by_name() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on("gradient_clipping"), clip_value=0.3)
    assert trainer.get_addon("gradient_clipping").clip_value == 0.3


def test_conformance(tmp_path: Any) -> None:
    report = check_addon(GradientClippingAddon, {"max_norm": 0.5}, workdir=tmp_path)
    assert report["sync"] == 0 and report["state"] == ["ckpt", "safetensors"]


class _TaggedParameter(nn.Parameter):
    """A parameter subclass: PyTorch, not the add-on, decides per step whether fused kernels apply."""


@pytest.mark.parametrize(
    "requested, subclass, expected",
    [(None, False, True), (None, True, None), (False, False, False), (True, False, True)],
)
def test_foreach_none_is_resolved_once_per_run_as_pytorch_would(
    monkeypatch: pytest.MonkeyPatch, requested: bool | None, subclass: bool, expected: bool | None
) -> None:
    passed: list[Any] = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params: Any, max_norm: float, norm_type: float, error_if_nonfinite: bool, foreach: Any) -> torch.Tensor:
        passed.append(foreach)
        return original(params, max_norm, norm_type, error_if_nonfinite, foreach)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(GradientClippingAddon(max_norm=0.1, foreach=requested)), lr=LR)
    if subclass:
        trainer.model.weight = _TaggedParameter(trainer.model.weight.detach().clone())
        trainer.optimizer.param_groups[0]["params"][0] = trainer.model.weight
    batches = list(tiny_loader(24))
    trainer.run(1, batches)
    assert passed == [expected] * 3
    assert trainer.get_addon("gradient_clipping").foreach is requested  # the setting itself is unchanged
    # the same result whichever way foreach was resolved
    reference = tiny_trainer(TinyRegressionTrainer.add_on(GradientClippingAddon(max_norm=0.1, foreach=False)), lr=LR)
    reference.run(1, batches)
    for got, want in zip(trainer.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-7)
