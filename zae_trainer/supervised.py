"""SupervisedTrainer: the trainer that configs and the command line build.

For ``(inputs, targets)`` batches: ``loss = loss_fn(model(inputs), targets)``. For
classification (integer targets, logits of shape ``(N, C)``) it also reports accuracy,
computed on the device.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .errors import StepOutputError
from .trainer import Trainer

__all__ = ["SupervisedTrainer"]


class SupervisedTrainer(Trainer):
    """A ready trainer for ``(inputs, targets)`` data; pass ``loss_fn=`` to the constructor.

    Examples
    --------
    >>> model = nn.Linear(4, 3)
    >>> trainer = SupervisedTrainer(model, "cpu", "train", torch.optim.SGD(model.parameters(), lr=0.1),
    ...                             None, loss_fn=nn.CrossEntropyLoss(), log_bar=False)
    """

    def __init__(self, *args: Any, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()

    def _split(self, batch: Any) -> tuple[Any, Any]:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise StepOutputError(
            f"SupervisedTrainer expects (inputs, targets) batches, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + "; subclass Trainer and write train_step for other layouts"
        )

    def _step(self, batch: Any, keep_output: bool = False) -> dict[str, Any]:
        inputs, targets = self._split(batch)
        outputs = self.model(inputs)
        result: dict[str, Any] = {"loss": self.loss_fn(outputs, targets)}
        if keep_output:
            result["output"] = outputs
        if (
            isinstance(outputs, torch.Tensor)
            and outputs.dim() == 2
            and isinstance(targets, torch.Tensor)
            and targets.dim() == 1
            and not targets.is_floating_point()
        ):
            result["acc"] = (outputs.argmax(1) == targets).float().mean()
        return result

    def train_step(self, batch: Any) -> dict[str, Any]:
        return self._step(batch)

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self._step(batch, keep_output=True)
