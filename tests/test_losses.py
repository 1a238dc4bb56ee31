"""Our losses against hand computations and torch's own where torch has one."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from zae_trainer.losses import BinaryCrossEntropyLoss, CrossEntropyLoss, binary_cross_entropy, cross_entropy


def test_cross_entropy_with_label_smoothing_matches_a_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    target = torch.tensor([0, 2])
    eps = 0.1
    log_p = torch.log_softmax(logits, dim=1)
    smoothed = torch.full_like(log_p, eps / 3)
    smoothed[torch.arange(2), target] += 1 - eps
    expected = -(smoothed * log_p).sum(1)
    assert torch.allclose(cross_entropy(logits, target, label_smoothing=eps, reduction="none"), expected)
    assert torch.allclose(CrossEntropyLoss(label_smoothing=eps)(logits, target), expected.mean())
    assert torch.allclose(CrossEntropyLoss(label_smoothing=eps, reduction="sum")(logits, target), expected.sum())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_cross_entropy_smooths_targets_toward_one_half(reduction: str) -> None:
    logits = torch.tensor([1.5, -0.5, 0.0, 3.0])
    target = torch.tensor([1.0, 0.0, 1.0, 0.0])
    eps = 0.2
    soft = target * (1 - eps) + 0.5 * eps  # 0.9 / 0.1
    p = torch.sigmoid(logits)
    per_item = -(soft * torch.log(p) + (1 - soft) * torch.log(1 - p))
    expected = {"mean": per_item.mean(), "sum": per_item.sum(), "none": per_item}[reduction]
    got = BinaryCrossEntropyLoss(label_smoothing=eps, reduction=reduction)(logits, target)  # type: ignore[arg-type]
    assert torch.allclose(got, expected, atol=1e-6)
    from_probs = binary_cross_entropy(p, target, label_smoothing=eps, reduction=reduction, from_logits=False)  # type: ignore[arg-type]
    assert torch.allclose(from_probs, expected, atol=1e-5)


def test_binary_cross_entropy_without_smoothing_equals_torch() -> None:
    logits, target = torch.randn(6), torch.tensor([1, 0, 1, 1, 0, 0])
    assert torch.allclose(binary_cross_entropy(logits, target), F.binary_cross_entropy_with_logits(logits, target.float()))
    weight = torch.tensor(3.0)
    assert torch.allclose(
        binary_cross_entropy(logits, target, pos_weight=weight),
        F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=weight),
    )


def test_binary_smoothing_at_the_limit_makes_every_target_one_half() -> None:
    logits = torch.zeros(3)
    loss = binary_cross_entropy(logits, torch.tensor([0.0, 1.0, 1.0]), label_smoothing=0.999999)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label_smoothing": 1.0}, "label_smoothing must be in"),
        ({"label_smoothing": -0.1}, "label_smoothing must be in"),
        ({"reduction": "avg"}, "reduction must be"),
    ],
)
def test_invalid_options_name_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BinaryCrossEntropyLoss(**kwargs)
    with pytest.raises(ValueError, match=message):
        CrossEntropyLoss(**kwargs)


def test_binary_shape_mismatch_says_how_to_fix() -> None:
    with pytest.raises(ValueError, match="view_as"):
        binary_cross_entropy(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ValueError, match="pos_weight needs from_logits"):
        binary_cross_entropy(torch.full((2,), 0.5), torch.zeros(2), from_logits=False, pos_weight=torch.tensor(2.0))
