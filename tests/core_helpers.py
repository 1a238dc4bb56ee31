"""Small pieces the core tests share: a tiny regression trainer and an event recorder."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zae_trainer import AddOn, Event, Trainer
from zae_trainer.events import EVENT_ARGUMENTS


class TinyTrainer(Trainer):
    """Least-squares regression: ``loss = mse(model(x), y)``."""

    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model(x), y)}

    def test_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        out = self.model(x)
        return {"loss": nn.functional.mse_loss(out, y), "output": out}


class StepLossTrainer(TinyTrainer):
    """Keeps every training batch's loss as a float, through the ``record_step`` extension point.

    Reads one value per step (a sync): for tests that compare per-step values, never for speed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_losses: list[float] = []

    def record_step(self, outputs: Any, batch_size: int) -> None:
        super().record_step(outputs, batch_size)
        if self.phase == "train":
            self.step_losses.append(float(outputs["loss"].detach()))


def tiny_data(n: int = 20, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def tiny_loader(n: int = 20, batch_size: int = 8, seed: int = 0, **kwargs: Any) -> DataLoader:
    return DataLoader(tiny_data(n, seed), batch_size=batch_size, **kwargs)


def tiny_trainer(cls: type = TinyTrainer, lr: float = 0.1, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    kwargs.setdefault("log_bar", False)
    kwargs.setdefault("handle_signals", False)
    return cls(model, "cpu", "train", torch.optim.SGD(model.parameters(), lr=lr), None, **kwargs)


class Recorder(AddOn):
    """Records every event as ``"<EVENT> e<epoch> s<step>"`` into ``self.trace``."""

    def __init__(self) -> None:
        self.trace: list[str] = []

    def _note(self, trainer: Any, event: Event, extra: str = "") -> None:
        pc = trainer.progress_checker
        self.trace.append(f"{event.name} e{pc.epoch} s{pc.step}{extra}")


def _make_hook(event: Event) -> Any:
    if event in EVENT_ARGUMENTS:
        def hook(self: Recorder, trainer: Any, arg: Any) -> None:
            detail = f" {type(arg).__name__}" if event is Event.EXCEPTION else ""
            self._note(trainer, event, detail)
    else:
        def hook(self: Recorder, trainer: Any) -> None:  # type: ignore[misc]
            self._note(trainer, event)
    hook.__name__ = event.value
    return hook


for _event in Event:
    setattr(Recorder, _event.value, _make_hook(_event))
