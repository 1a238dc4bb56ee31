"""SupervisedTrainer: keyword-first construction, names resolved at construction, binary accuracy."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from zae_trainer import SupervisedTrainer, TrainerConfigError, from_config
from zae_trainer.losses import BinaryCrossEntropyLoss, Criterion, CrossEntropyLoss, task_of


def blobs(n: int = 96, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Separable clusters: class k sits around 3 * e_k."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 3.0 * F.one_hot(y, 4).float() + 0.5 * torch.randn(n, 4, generator=g)
    return TensorDataset(x, y)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


QUIET: dict[str, Any] = {"device": "cpu", "log_bar": False, "handle_signals": False}


def test_keyword_settings_alone_build_and_train_like_a_config() -> None:
    trainer = SupervisedTrainer(
        model(), optimizer="AdamW", lr=1e-2, weight_decay=1e-4, loss="cross_entropy", label_smoothing=0.1,
        train_dataset=blobs(), valid_dataset=blobs(seed=1), batch_size=16, valid_batch_size=48, shuffle=True,
        num_workers=0, seed=3, **QUIET,
    )
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-2 and trainer.optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert isinstance(trainer.loss_fn, CrossEntropyLoss) and trainer.loss_fn.label_smoothing == 0.1
    assert trainer.loaders["train"].batch_size == 16 and trainer.loaders["valid"].batch_size == 48
    trainer.run(3)  # the loaders built from the datasets
    assert trainer.epoch_metrics["valid/acc"] > 0.9
    assert len(trainer.history) == 3
    with pytest.raises(TrainerConfigError, match="give test_dataset="):
        trainer.test()
    trainer.loaders["test"] = trainer.loaders["valid"]
    assert trainer.test() == pytest.approx({"test/loss": trainer.history[-1]["valid/loss"],
                                            "test/acc": trainer.history[-1]["valid/acc"]})
    assert len(trainer.history) == 3

    config_built = from_config({
        "model": model(),
        "optimizer": {"name": "AdamW", "lr": 1e-2, "weight_decay": 1e-4},
        "loss": {"name": "cross_entropy", "label_smoothing": 0.1},
        "trainer": QUIET,
    })
    from torch.utils.data import DataLoader

    config_built.run(3, DataLoader(blobs(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3)),
                     DataLoader(blobs(seed=1), batch_size=48))
    for a, b in zip(trainer.model.parameters(), config_built.model.parameters()):
        assert torch.equal(a, b)  # the same run, whichever way it was described
    assert trainer.history == config_built.history


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"optimizer": "Adam", "loss": "CrossEntropyLos"}, "Did you mean 'CrossEntropyLoss'"),
        ({"optimizer": "Adamw"}, "Did you mean 'AdamW'"),
        ({"optimizer": "AdamW", "momentum": 0.9}, "AdamW has no setting 'momentum'"),
        ({"optimizer": "SGD", "lr": 0.1, "optimizer_args": {"nesterov": True}}, "Nesterov momentum requires"),
        ({"optimizer": "SGD", "loss": "BCEWithLogitsLoss", "label_smoothing": 0.1}, "name 'bce'"),
        ({"optimizer": "SGD", "loss": nn.CrossEntropyLoss(), "label_smoothing": 0.1}, "loss='cross_entropy'"),
        ({"optimizer": "SGD", "loss": "bce", "loss_args": {"smoothing": 0.1}}, "Did you mean 'label_smoothing'"),
        ({"optimizer": "SGD", "scheduler": "StepLR"}, "step_size"),
        ({"optimizer": "SGD", "scheduler": "CosineAnealingLR"}, "Did you mean 'CosineAnnealingLR'"),
        ({"optimizer": "SGD", "batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"optimizer": "SGD", "train_dataset": 5}, "train_dataset must be a torch Dataset"),
    ],
)
def test_names_and_settings_fail_at_construction_with_a_fix(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(TrainerConfigError, match="SupervisedTrainer argument") as info:
        SupervisedTrainer(model(), **settings, **QUIET)
    assert message in str(info.value)


def test_settings_for_a_built_optimizer_are_refused_not_ignored() -> None:
    net = model()
    with pytest.raises(TrainerConfigError, match=r"argument lr: .*optimizer is a built SGD"):
        SupervisedTrainer(net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), lr=0.5, **QUIET)
    with pytest.raises(TrainerConfigError, match="loss= or loss_fn="):
        SupervisedTrainer(net, optimizer="SGD", loss="bce", loss_fn=nn.MSELoss(), **QUIET)
    with pytest.raises(TrainerConfigError, match="give train_dataset="):
        SupervisedTrainer(net, optimizer="SGD", **QUIET).run(1)


def test_torch_loss_names_resolve_to_torch_losses() -> None:
    trainer = SupervisedTrainer(model(), optimizer="SGD", loss="CrossEntropyLoss", label_smoothing=0.2, **QUIET)
    assert type(trainer.loss_fn) is nn.CrossEntropyLoss and trainer.loss_fn.label_smoothing == 0.2
    x, y = blobs(8)[:]
    with torch.no_grad():
        expected = F.cross_entropy(trainer.model(x), y, label_smoothing=0.2)
    assert torch.allclose(trainer.test_step((x, y))["loss"], expected)


BINARY_CASES = [
    # (loss, output shape, target shape, integer targets)
    (BinaryCrossEntropyLoss(), (8, 1), (8,), False),
    (BinaryCrossEntropyLoss(label_smoothing=0.1), (8,), (8, 1), True),
    (nn.BCEWithLogitsLoss(), (8, 1), (8, 1), True),
    ("bce", (8,), (8,), False),
]


@pytest.mark.parametrize(("loss", "out_shape", "target_shape", "integer"), BINARY_CASES)
def test_binary_accuracy_from_logits_whatever_the_shapes(loss: Any, out_shape: tuple, target_shape: tuple,
                                                         integer: bool) -> None:
    logits = torch.tensor([2.0, -1.0, 0.3, -0.2, 5.0, -3.0, 0.1, -0.1])
    target = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1])  # predictions: 1 0 1 0 1 0 1 0 -> 5 of 8 right
    net = nn.Identity()
    trainer = SupervisedTrainer(net, mode="test", loss=loss, **QUIET)
    t = target.reshape(target_shape)
    out = trainer.test_step((logits.reshape(out_shape), t if integer else t.float()))
    assert out["acc"].item() == pytest.approx(5 / 8)
    smoothing = getattr(trainer.loss_fn, "label_smoothing", 0.0)
    soft = target.float() * (1 - smoothing) + 0.5 * smoothing
    assert torch.allclose(out["loss"], F.binary_cross_entropy_with_logits(logits, soft))


def test_binary_accuracy_from_probabilities_thresholds_at_one_half() -> None:
    probabilities = torch.tensor([[0.9], [0.4], [0.6], [0.2]])
    target = torch.tensor([1.0, 1.0, 0.0, 0.0])
    for loss in (nn.BCELoss(), BinaryCrossEntropyLoss(from_logits=False)):
        trainer = SupervisedTrainer(nn.Identity(), mode="test", loss=loss, **QUIET)
        assert trainer.task == "binary-probabilities"
        assert trainer.test_step((probabilities, target))["acc"].item() == pytest.approx(0.5)


def test_a_binary_task_trains_and_reports_accuracy_every_epoch() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 2, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).float()
    data = TensorDataset(x, y)
    torch.manual_seed(0)
    trainer = SupervisedTrainer(nn.Linear(2, 1), optimizer="SGD", lr=0.5, loss="bce", label_smoothing=0.05,
                                train_dataset=data, valid_dataset=data, batch_size=32, seed=0, **QUIET)
    trainer.run(4)
    assert [round(h["valid/acc"], 3) >= 0 for h in trainer.history] == [True] * 4
    assert trainer.history[-1]["valid/acc"] > 0.9 and trainer.history[-1]["train/acc"] > 0.85


def test_regression_reports_no_accuracy_and_custom_criteria_can_say_their_task() -> None:
    trainer = SupervisedTrainer(nn.Linear(3, 1), optimizer="SGD", loss="MSELoss", **QUIET)
    assert trainer.task is None
    assert "acc" not in trainer.test_step((torch.randn(4, 3), torch.randn(4, 1)))

    class Hinge(nn.Module):
        task = "binary"

        def forward(self, score: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.relu(1 - (2 * target - 1) * score).mean()

    hinge = Hinge()
    assert isinstance(hinge, Criterion) and task_of(hinge) == "binary-logits"
    trainer.loss_fn = hinge  # assigning a criterion updates the task
    trainer.model = nn.Identity()
    out = trainer.test_step((torch.tensor([[1.0], [-2.0]]), torch.tensor([1, 1])))
    assert trainer.task == "binary-logits" and out["acc"].item() == 0.5
    with pytest.raises(TypeError, match="must be callable"):
        trainer.loss_fn = "bce"  # type: ignore[assignment]
