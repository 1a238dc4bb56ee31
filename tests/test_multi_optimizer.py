"""Several optimizers and schedulers on one trainer: a tiny GAN (examples/gan_two_optimizers.py)."""

from __future__ import annotations

import glob
import math
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from zae_trainer.addons import GradientClippingAddon, NonFiniteGuardAddon, PrecisionMixerAddon
from zae_trainer.addons.checkpoint import read_checkpoint
from zae_trainer.errors import NonFiniteLossError, StepOutputError, TrainerConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gan_two_optimizers.py"


@pytest.fixture(scope="module")
def gan() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gan_two_optimizers", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gan_two_optimizers"] = module
    spec.loader.exec_module(module)
    return module


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_the_example_gan_trains(gan: ModuleType) -> None:
    trainer = gan.main([])
    history = trainer.history
    assert len(history) == 3
    assert set(history[0]) == {"train/loss", "train/loss/discriminator", "train/loss/generator", "valid/loss"}
    assert history[0]["train/loss"] == pytest.approx(
        history[0]["train/loss/discriminator"] + history[0]["train/loss/generator"], rel=1e-6
    )
    assert history[-1]["valid/loss"] < history[0]["valid/loss"] / 4  # the generated mean moved to the target
    # both schedulers stepped once per epoch
    assert trainer.optimizers["discriminator"].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5)
    assert trainer.optimizers["generator"].param_groups[0]["lr"] == pytest.approx(0.01 * 0.9**3)
    assert trainer.optimizer is trainer.optimizers["discriminator"] and trainer.stepping is None


def test_each_loss_steps_only_its_own_optimizers_parameters(gan: ModuleType) -> None:
    trainer = gan.make_trainer()
    (batch,) = [next(iter(gan.data()))]
    before = params(trainer.model)

    # the same step by hand: each optimizer's gradients come from its own loss only
    reference = gan.make_trainer()
    torch.manual_seed(123)
    losses = reference.train_step(batch)["loss"]
    disc, gen = reference.model["discriminator"], reference.model["generator"]
    d_grads = torch.autograd.grad(losses["discriminator"], list(disc.parameters()), retain_graph=True)
    g_grads = torch.autograd.grad(losses["generator"], list(gen.parameters()))
    for p, g in zip(disc.parameters(), d_grads):
        p.grad = g
    for p, g in zip(gen.parameters(), g_grads):
        p.grad = g
    reference.optimizers["discriminator"].step()
    reference.optimizers["generator"].step()

    torch.manual_seed(123)
    trainer.run(None, [batch], max_steps=1)
    after = params(trainer.model)
    expected = params(reference.model)
    assert trainer.progress_checker.step == 1
    for key in before:
        assert not torch.equal(after[key], before[key]), key  # both networks moved
        torch.testing.assert_close(after[key], expected[key], rtol=0, atol=1e-7)
    assert all(p.grad is None for p in trainer.model.parameters())  # zeroed after the steps


def test_a_checkpoint_holds_both_optimizers_and_resume_is_bit_identical(gan: ModuleType, tmp_path: Any) -> None:
    straight = gan.make_trainer(str(tmp_path / "straight"))
    straight.run(3, gan.data())

    first = gan.make_trainer(str(tmp_path / "resumed"))
    first.run(1, gan.data())
    files = sorted(glob.glob(str(tmp_path / "resumed" / "*.ckpt")))
    assert files, os.listdir(tmp_path / "resumed")
    checkpoint = read_checkpoint(files[-1])
    assert checkpoint["optimizer"]["state"]  # the first optimizer (discriminator, SGD momentum buffers)
    assert "momentum_buffer" in checkpoint["optimizer"]["state"][0]
    generator_state = checkpoint["optimizers"]["generator"]["state"]
    assert {"exp_avg", "exp_avg_sq"} <= set(generator_state[0])  # the generator's Adam moments
    assert set(checkpoint["scheduler"]) == {"discriminator", "generator"}

    resumed = gan.make_trainer(str(tmp_path / "resumed"), resume="latest")
    resumed.run(3, gan.data())
    assert resumed.progress_checker.epoch == 3
    for key, value in params(straight.model).items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for name in ("discriminator", "generator"):
        a, b = straight.optimizers[name].state_dict(), resumed.optimizers[name].state_dict()
        assert a["param_groups"] == b["param_groups"]
        for index, state in a["state"].items():
            for k, v in state.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][index][k])), (name, k)


def test_clipping_applies_to_each_optimizers_parameters(gan: ModuleType) -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"generator": nn.Linear(2, 2), "discriminator": nn.Linear(2, 1)})
    optimizers = {  # plain SGD, lr 1: each update is minus that optimizer's clipped gradient
        "discriminator": torch.optim.SGD(model["discriminator"].parameters(), lr=1.0),
        "generator": torch.optim.SGD(model["generator"].parameters(), lr=1.0),
    }
    built = gan.GanTrainer.add_on(GradientClippingAddon(max_norm=1e-3))
    trainer = built(model, "cpu", "train", optimizers, log_bar=False, log_every_n_steps=1)
    before = {name: params(model[name]) for name in optimizers}
    trainer.run(None, [next(iter(gan.data()))], max_steps=1)
    for name in optimizers:
        moved = torch.cat([(v - before[name][k]).flatten() for k, v in model[name].state_dict().items()])
        # each optimizer's own gradients were clipped to norm 1e-3 (one joint clip would give each less)
        assert float(moved.norm()) == pytest.approx(1e-3, rel=1e-4), name
    norms = trainer.history[-1]
    assert norms["train/grad_norm/discriminator"] > 1e-3 and norms["train/grad_norm/generator"] > 1e-3


def test_wrong_loss_names_and_fp16_are_refused(gan: ModuleType) -> None:
    trainer = gan.make_trainer()

    class Misnamed(gan.GanTrainer):  # type: ignore[name-defined, misc]
        def train_step(self, batch: Any) -> dict[str, Any]:
            return {"loss": {"generatr": super().train_step(batch)["loss"]["generator"]}}

    model, opts = trainer.model, trainer.optimizers
    misnamed = Misnamed(model, "cpu", "train", opts, log_bar=False)
    with pytest.raises(StepOutputError, match="'generatr'.*name no optimizer"):
        misnamed.run(1, gan.data())
    with pytest.raises(TrainerConfigError, match="fp16 loss scaling with several optimizers"):
        gan.GanTrainer.add_on(PrecisionMixerAddon(precision="fp16"))(model, "cpu", "train", opts, log_bar=False)
    with pytest.raises(ValueError, match="held by both optimizer"):
        gan.GanTrainer(model, "cpu", "train", {"a": opts["generator"], "b": torch.optim.SGD(
            model["generator"].parameters(), lr=0.1)}, log_bar=False)


@pytest.mark.parametrize("shapes", [((), ()), ((1,), (1,)), ((1,), ())])
def test_train_loss_is_the_sum_of_the_optimizers_losses_whatever_their_one_element_shapes(
    gan: ModuleType, shapes: tuple[tuple[int, ...], tuple[int, ...]]
) -> None:
    class Shaped(gan.GanTrainer):  # type: ignore[name-defined, misc]
        def train_step(self, batch: Any) -> dict[str, Any]:
            losses = super().train_step(batch)["loss"]
            return {"loss": {"discriminator": losses["discriminator"].reshape(shapes[0]),
                             "generator": losses["generator"].reshape(shapes[1])}}

    template = gan.make_trainer()
    trainer = Shaped(template.model, "cpu", "train", template.optimizers, log_bar=False)
    trainer.run(1, gan.data())
    first = trainer.history[0]
    assert first["train/loss"] == pytest.approx(first["train/loss/discriminator"] + first["train/loss/generator"], rel=1e-6)
    assert math.isfinite(first["train/loss"]) and first["train/loss"] > 0


def test_a_non_finite_loss_of_one_optimizer_skips_the_step_for_both(gan: ModuleType) -> None:
    class Poisoned(gan.GanTrainer):  # type: ignore[name-defined, misc]
        def train_step(self, batch: Any) -> dict[str, Any]:
            losses = super().train_step(batch)["loss"]
            return {"loss": {"discriminator": losses["discriminator"], "generator": losses["generator"] * math.nan}}

    template = gan.make_trainer()
    model, opts = template.model, template.optimizers
    before = params(model)
    skipping = Poisoned.add_on(NonFiniteGuardAddon(policy="skip"))(model, "cpu", "train", opts, log_bar=False)
    skipping.run(None, [next(iter(gan.data()))], max_steps=1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # neither network moved
    assert skipping.progress_checker.skipped_steps == 2 and skipping.get_addon("nonfinite_guard").skipped == 1

    plain = Poisoned(model, "cpu", "train", opts, log_bar=False)  # the core's own check reads train/loss
    with pytest.raises(NonFiniteLossError):
        plain.run(1, gan.data())


def test_a_scheduler_dict_with_one_optimizer_steps_all_of_them_and_resumes(tmp_path: Any) -> None:
    from core_helpers import TinyTrainer, tiny_loader

    from zae_trainer.addons import StateManagerAddon
    from zae_trainer.optimizers import SchedulerGroup

    def make(**settings: Any) -> Any:
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        schedulers = {
            "lr": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
            "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1, threshold=10.0),
        }
        built = TinyTrainer.add_on(StateManagerAddon)
        return built(model, "cpu", "train", opt, schedulers, log_bar=False, save_path=str(tmp_path), **settings)

    trainer = make()
    assert isinstance(trainer.scheduler, SchedulerGroup)
    trainer.run(2, tiny_loader())
    # StepLR halves it every epoch; the plateau (threshold 10: nothing counts as better) cuts it tenfold
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * (0.5 * 0.1) ** 2)
    state = trainer.scheduler.state_dict()
    assert set(state) == {"lr", "plateau"} and state["lr"]["last_epoch"] == 2

    resumed = make(resume="latest")
    resumed.run(2, tiny_loader())
    assert resumed.scheduler.state_dict()["lr"]["last_epoch"] == 2
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.optimizer.param_groups[0]["lr"])
