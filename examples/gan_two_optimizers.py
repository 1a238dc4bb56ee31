"""A tiny GAN with two optimizers: the generator learns a 2-D Gaussian's mean.

One trainer owns both optimizers (``optimizer={"discriminator": ..., "generator": ...}``) and
a scheduler for each; ``train_step`` returns one loss per optimizer, and each loss steps only
its own optimizer's parameters. Both optimizers and both schedulers are in every checkpoint,
so a run resumed with ``resume="latest"`` continues exactly.

Run:  python examples/gan_two_optimizers.py [--epochs 3] [--save-path runs/gan]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zae_trainer import Trainer
from zae_trainer.addons import GradientClippingAddon, StateManagerAddon

TARGET_MEAN = (2.0, -1.0)


class GanTrainer(Trainer):
    """``model`` is a ``ModuleDict`` with a ``generator`` (noise -> point) and a ``discriminator``."""

    def train_step(self, batch: Any) -> dict[str, Any]:
        (real,) = batch
        gen, disc = self.model["generator"], self.model["discriminator"]
        fake = gen(torch.randn(len(real), 2, device=real.device))
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(real), 1, device=real.device), torch.zeros(len(real), 1, device=real.device)
        # the discriminator's loss sees a detached fake: its backward stops at the generator
        d_loss = bce(disc(real), ones) + bce(disc(fake.detach()), zeros)
        g_loss = bce(disc(fake), ones)  # flows through the discriminator, steps the generator only
        return {"loss": {"discriminator": d_loss, "generator": g_loss}}

    def test_step(self, batch: Any) -> dict[str, Any]:
        (real,) = batch
        fake = self.model["generator"](torch.randn(len(real), 2, device=real.device))
        return {"loss": (fake.mean(0) - real.mean(0)).pow(2).sum()}  # distance of the means


def make_trainer(save_path: str | None = None, clip: float | None = None, **settings: Any) -> GanTrainer:
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "generator": nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2)),
        "discriminator": nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1)),
    })
    optimizers = {
        "discriminator": torch.optim.SGD(model["discriminator"].parameters(), lr=0.05, momentum=0.5),
        "generator": torch.optim.Adam(model["generator"].parameters(), lr=0.01, betas=(0.5, 0.999)),
    }
    schedulers = {
        "discriminator": torch.optim.lr_scheduler.StepLR(optimizers["discriminator"], step_size=2, gamma=0.5),
        "generator": torch.optim.lr_scheduler.ExponentialLR(optimizers["generator"], gamma=0.9),
    }
    addons: list[Any] = []
    if save_path is not None:
        addons.append(StateManagerAddon)
        settings["save_path"] = save_path
    if clip is not None:
        addons.append(GradientClippingAddon(max_norm=clip))
    cls = GanTrainer.add_on(*addons) if addons else GanTrainer
    settings.setdefault("log_bar", False)
    return cls(model, "cpu", "train", optimizers, schedulers, **settings)  # type: ignore[no-any-return]


def data(n: int = 256, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(n, 2, generator=g) * 0.5 + torch.tensor(TARGET_MEAN)
    return DataLoader(TensorDataset(points), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))


def main(argv: list[str] | None = None) -> GanTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--save-path", default=None)
    args = parser.parse_args(argv)
    trainer = make_trainer(args.save_path)
    trainer.run(args.epochs, data(), data(n=64, seed=2))
    print(f"distance of the means on held-out noise: {trainer.history[-1]['valid/loss']:.4f}")
    return trainer


if __name__ == "__main__":
    main()
