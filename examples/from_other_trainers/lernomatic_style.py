"""lernomatic-style: a trainer configured by keyword arguments with defaults (``lr``,
``momentum``, ``save_every`` iterations, ``save_best``, ``print_every``, ``stop_when_acc``),
an LR scheduler and a separate momentum scheduler, history saved and loaded, and an
autoencoder and a GAN as subclasses of the same trainer (the GAN with two optimizers).

lernomatic put every option in one constructor. Here :func:`make_trainer` maps those keywords
onto a trainer class and the add-ons that do each job, so each option is one line:

================  ==================================================================
``save_every``    ``StateManagerAddon(save_every_n_steps=...)`` (iterations)
``save_best``     ``keep_top_k=1`` by the monitored metric (``valid/acc``)
``print_every``   ``log_every_n_steps``, and a 10-line add-on that prints at log points
``stop_when_acc`` ``EarlyStoppingAddon(stopping_threshold=...)`` on ``valid/acc``
LR schedule       a ``torch.optim.lr_scheduler`` stepped per batch
momentum sched.   :class:`MomentumSchedulerAddon` below: an add-on with its own state
history           ``trainer.history`` (one dict per epoch), in every checkpoint; saved to
                  JSON and loaded back into a fresh trainer with ``load_state``
GAN               ``optimizer={"generator": ..., "discriminator": ...}``; ``train_step``
                  returns one loss per optimizer, each steps only its own parameters
================  ==================================================================

Run:  python examples/from_other_trainers/lernomatic_style.py [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from zae_trainer import AddOn, Trainer  # noqa: E402
from zae_trainer.addons import EarlyStoppingAddon, StateManagerAddon  # noqa: E402


class PrintEveryAddon(AddOn):
    """Prints the step metrics at every log point (``print_every`` steps)."""

    name = "print_every"

    def on_log(self, trainer: Any, metrics: Mapping[str, float]) -> None:
        pc = trainer.progress_checker
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        group = trainer.optimizer.param_groups[0]
        momentum = f"  momentum {group['momentum']:.3f}" if "momentum" in group else ""
        print(f"[epoch {pc.epoch + 1} step {pc.step}] {shown}  lr {group['lr']:.2e}{momentum}")


class MomentumSchedulerAddon(AddOn):
    """Moves SGD's momentum linearly from ``start`` to ``end`` over ``total_steps`` steps.

    Its position is in checkpoints (``state_dict``), so a resumed run continues the schedule.
    """

    name = "momentum_scheduler"

    def __init__(self, *, start: float = 0.5, end: float = 0.95, total_steps: int = 100) -> None:
        self.start, self.end, self.total_steps = start, end, max(1, total_steps)
        self.steps = 0

    def value(self) -> float:
        return self.start + (self.end - self.start) * min(1.0, self.steps / self.total_steps)

    def on_run_begin(self, trainer: Any) -> None:
        self._apply(trainer)

    def on_after_optimizer_step(self, trainer: Any) -> None:
        self.steps += 1
        self._apply(trainer)

    def _apply(self, trainer: Any) -> None:
        for group in trainer.optimizer.param_groups:
            group["momentum"] = self.value()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])


class Classifier(Trainer):
    """Cross-entropy with accuracy."""

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self.model(x)
        return {"loss": nn.functional.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}

    def test_step(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.train_step(batch)


class AutoencoderTrainer(Classifier):
    """The same trainer, subclassed for an autoencoder: reconstruct the input, ignore labels."""

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        x, _ = batch
        return {"loss": nn.functional.mse_loss(self.model(x), x)}


class GANTrainer(Classifier):
    """The same trainer, subclassed for a GAN: ``model`` holds a generator and a discriminator,
    and each loss steps its own optimizer. The generator learns to produce the data's points."""

    def train_step(self, batch: Any) -> dict[str, Any]:
        real, _ = batch
        gen, disc = self.model["generator"], self.model["discriminator"]
        fake = gen(torch.randn(len(real), 2, device=real.device))
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(real), 1, device=real.device), torch.zeros(len(real), 1, device=real.device)
        d_loss = bce(disc(real), ones) + bce(disc(fake.detach()), zeros)  # detached: steps D only
        g_loss = bce(disc(fake), ones)  # through D, but steps G only
        return {"loss": {"discriminator": d_loss, "generator": g_loss}}

    def test_step(self, batch: Any) -> dict[str, Any]:
        real, _ = batch
        fake = self.model["generator"](torch.randn(len(real), 2, device=real.device))
        return {"loss": (fake.mean(0) - real.mean(0)).pow(2).sum()}  # distance between the means


def make_trainer(
    cls: type[Trainer],
    model: nn.Module,
    *,
    lr: float = 0.05,
    momentum: float = 0.5,
    final_momentum: float = 0.9,
    weight_decay: float = 0.0,
    lr_gamma: float = 0.995,
    save_every: int = 0,
    save_best: bool = True,
    print_every: int = 10,
    stop_when_acc: float | None = None,
    checkpoint_dir: str | None = None,
    total_steps: int = 100,
    device: str = "cpu",
) -> Trainer:
    """lernomatic's keyword arguments with their defaults, mapped onto add-ons."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_gamma)  # stepped every iteration
    addons: list[Any] = [
        PrintEveryAddon(),
        MomentumSchedulerAddon(start=momentum, end=final_momentum, total_steps=total_steps),
    ]
    if checkpoint_dir is not None:
        addons.append(StateManagerAddon(
            save_path=checkpoint_dir, save_every_n_steps=save_every or None, keep_top_k=1 if save_best else 0,
            keep_last=1,
        ))
    if stop_when_acc is not None:
        addons.append(EarlyStoppingAddon(monitor="valid/acc", mode="max", patience=10**6,
                                         stopping_threshold=stop_when_acc))
    classifier = cls is not AutoencoderTrainer
    return cls.add_on(*addons)(
        model, device=device, optimizer=optimizer, scheduler=scheduler, scheduler_step_on_batch=True,
        log_every_n_steps=print_every, log_bar=False,
        monitor="valid/acc" if classifier else "valid/loss", monitor_mode="max" if classifier else "min",
    )


def digits_loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, valid = order[:1400], order[1400:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=50, shuffle=True,
                   generator=torch.Generator().manual_seed(seed)),
        DataLoader(TensorDataset(x[valid], y[valid]), batch_size=200),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--stop-when-acc", type=float, default=0.93)
    parser.add_argument("--out", default=None, help="folder for checkpoints and history (default: temporary)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="lernomatic-style-")
    train, valid = digits_loaders()

    # the classifier: stops as soon as validation accuracy reaches --stop-when-acc
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    trainer = make_trainer(Classifier, net, lr=0.2, save_every=14, print_every=14, stop_when_acc=args.stop_when_acc,
                           checkpoint_dir=os.path.join(out, "classifier"), total_steps=len(train) * args.epochs)
    trainer.run(args.epochs, train, valid)
    history_file = os.path.join(out, "history.json")
    with open(history_file, "w") as f:
        json.dump(trainer.history, f, indent=1)
    print(f"classifier: {len(trainer.history)} epoch(s), valid/acc {trainer.history[-1]['valid/acc']:.4f}"
          + (f"; {trainer.stop_reason}" if trainer.stop_reason else ""))

    # history load: a fresh trainer restored from the last checkpoint holds the same history
    fresh = make_trainer(Classifier, nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)),
                         checkpoint_dir=os.path.join(out, "classifier"), total_steps=len(train) * args.epochs)
    fresh.load_state("latest")
    with open(history_file) as f:
        saved_history = json.load(f)
    momentum = fresh.get_addon("momentum_scheduler")
    print(f"history reloaded: {len(fresh.history)} epoch(s), equal to {history_file}: {fresh.history == saved_history}; "
          f"momentum schedule resumes at step {momentum.steps} ({momentum.value():.3f})")

    # the autoencoder: the same trainer, subclassed
    torch.manual_seed(0)
    autoencoder = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 64), nn.Sigmoid())
    ae = make_trainer(AutoencoderTrainer, autoencoder, lr=0.5, print_every=28, total_steps=len(train) * 3)
    ae.run(3, train, valid)
    print(f"autoencoder: reconstruction loss {ae.history[0]['valid/loss']:.4f} -> {ae.history[-1]['valid/loss']:.4f}")

    # the GAN: two optimizers on one trainer, points of a 2-D Gaussian as the data
    torch.manual_seed(0)
    gan_model = nn.ModuleDict({
        "generator": nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2)),
        "discriminator": nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1)),
    })
    points = torch.randn(256, 2, generator=torch.Generator().manual_seed(1)) * 0.5 + torch.tensor([2.0, -1.0])
    gan_data = TensorDataset(points, torch.zeros(256))
    optimizers = {
        "discriminator": torch.optim.SGD(gan_model["discriminator"].parameters(), lr=0.05, momentum=0.5),
        "generator": torch.optim.Adam(gan_model["generator"].parameters(), lr=0.01, betas=(0.5, 0.999)),
    }
    schedulers = {  # one per optimizer, stepped together every epoch
        "discriminator": torch.optim.lr_scheduler.StepLR(optimizers["discriminator"], step_size=2, gamma=0.5),
        "generator": torch.optim.lr_scheduler.ExponentialLR(optimizers["generator"], gamma=0.9),
    }
    gan = GANTrainer.add_on(PrintEveryAddon())(
        gan_model, device="cpu", optimizer=optimizers, scheduler=schedulers, log_bar=False, log_every_n_steps=8,
    )
    gan.run(3, DataLoader(gan_data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)),
            DataLoader(gan_data, batch_size=256))
    print(f"GAN: distance between generated and real means {gan.history[0]['valid/loss']:.4f} -> "
          f"{gan.history[-1]['valid/loss']:.4f}")
    return {"trainer": trainer, "fresh": fresh, "autoencoder": ae, "gan": gan, "saved_history": saved_history,
            "out": out}


if __name__ == "__main__":
    main()
