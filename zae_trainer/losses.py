"""Losses that config-driven trainers name: cross-entropy and binary cross-entropy, both
with label smoothing and ``mean`` / ``sum`` / ``none`` reduction.

``torch.nn.CrossEntropyLoss`` already smooths multi-class labels; the binary losses in
``torch.nn`` do not. Here both exist with one signature, so a config can switch between
them by name.

Binary label smoothing moves each target toward 0.5: ``y * (1 - eps) + 0.5 * eps``.

Custom losses need no base class: anything callable as ``criterion(output, target)`` returning
a scalar tensor is a :class:`Criterion`. A ``task`` attribute (``"multiclass"`` or
``"binary"``, and ``from_logits`` for binary) tells :class:`~zae_trainer.SupervisedTrainer`
which accuracy to report; :func:`task_of` reads it, and knows torch's own losses.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Criterion",
    "CrossEntropyLoss",
    "BinaryCrossEntropyLoss",
    "cross_entropy",
    "binary_cross_entropy",
    "task_of",
    "Task",
    "LOSSES",
]

Reduction = Literal["mean", "sum", "none"]
Task = Literal["multiclass", "binary-logits", "binary-probabilities"]


@runtime_checkable
class Criterion(Protocol):
    """A loss as :class:`~zae_trainer.SupervisedTrainer` calls it: ``criterion(output, target)``
    returns a scalar tensor. ``nn.Module`` losses and plain functions both qualify.

    Optionally, a ``task`` attribute (``"multiclass"`` / ``"binary"``) and, for binary,
    ``from_logits`` say what the output means, so the trainer can report accuracy.

    Examples
    --------
    >>> class FocalLoss(nn.Module):
    ...     task = "binary"
    ...     from_logits = True
    ...     def forward(self, logits, target):
    ...         p = torch.sigmoid(logits)
    ...         pt = torch.where(target > 0.5, p, 1 - p)
    ...         return (-(1 - pt) ** 2 * torch.log(pt.clamp_min(1e-8))).mean()
    >>> isinstance(FocalLoss(), Criterion)
    True
    """

    def __call__(self, output: Any, target: Any, /) -> torch.Tensor: ...


def task_of(criterion: Any) -> Task | None:
    """What ``criterion``'s output means, for accuracy: multi-class logits, binary logits,
    binary probabilities, or None (unknown: regression, or a custom loss without ``task``)."""
    task = getattr(criterion, "task", None)
    if task == "multiclass":
        return "multiclass"
    if task == "binary":
        return "binary-logits" if getattr(criterion, "from_logits", True) else "binary-probabilities"
    if isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return "multiclass"
    if isinstance(criterion, nn.BCEWithLogitsLoss):
        return "binary-logits"
    if isinstance(criterion, nn.BCELoss):
        return "binary-probabilities"
    return None


def _check(label_smoothing: float, reduction: str) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, label_smoothing: float = 0.0, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Multi-class cross-entropy from logits ``(N, C, ...)`` and class indices ``(N, ...)``."""
    _check(label_smoothing, reduction)
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction=reduction)


def binary_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    from_logits: bool = True,
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy with label smoothing; ``from_logits=False`` takes probabilities."""
    _check(label_smoothing, reduction)
    if input.shape != target.shape:
        raise ValueError(
            f"binary_cross_entropy: input shape {tuple(input.shape)} and target shape {tuple(target.shape)} "
            "differ; reshape the target (e.g. target.view_as(input)) or the model output"
        )
    target = target.to(input.dtype)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + 0.5 * label_smoothing
    if from_logits:
        return F.binary_cross_entropy_with_logits(input, target, reduction=reduction, pos_weight=pos_weight)
    if pos_weight is not None:
        raise ValueError("pos_weight needs from_logits=True")
    return F.binary_cross_entropy(input, target, reduction=reduction)


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`cross_entropy` (a :class:`Criterion` of task ``"multiclass"``).

    Examples
    --------
    >>> loss = CrossEntropyLoss(label_smoothing=0.1)(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]))
    """

    task = "multiclass"

    def __init__(self, *, label_smoothing: float = 0.0, reduction: Reduction = "mean") -> None:
        super().__init__()
        _check(label_smoothing, reduction)
        self.label_smoothing = label_smoothing
        self.reduction: Reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, target, label_smoothing=self.label_smoothing, reduction=self.reduction)


class BinaryCrossEntropyLoss(nn.Module):
    """Module form of :func:`binary_cross_entropy` (from logits by default; task ``"binary"``).

    Examples
    --------
    >>> loss = BinaryCrossEntropyLoss(label_smoothing=0.1)(torch.randn(4), torch.tensor([0., 1., 1., 0.]))
    """

    task = "binary"

    def __init__(
        self,
        *,
        label_smoothing: float = 0.0,
        reduction: Reduction = "mean",
        from_logits: bool = True,
        pos_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        _check(label_smoothing, reduction)
        self.label_smoothing = label_smoothing
        self.reduction: Reduction = reduction
        self.from_logits = from_logits
        self.pos_weight = pos_weight

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return binary_cross_entropy(
            input,
            target,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            from_logits=self.from_logits,
            pos_weight=self.pos_weight,
        )


#: Names a config may use for our losses (``torch.nn`` losses are found by class name too).
LOSSES: dict[str, type[nn.Module]] = {
    "cross_entropy": CrossEntropyLoss,
    "binary_cross_entropy": BinaryCrossEntropyLoss,
    "bce": BinaryCrossEntropyLoss,
}
