"""Step outputs: memory stays flat over an epoch whatever the steps return; torchmetrics at epoch end."""

from __future__ import annotations

import collections
import gc
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import zae_trainer.metrics as metrics_module
from zae_trainer import Trainer
from zae_trainer.metrics import MetricAccumulator

torchmetrics = pytest.importorskip("torchmetrics")
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassF1Score  # noqa: E402


def _tensors_alive() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def _classification(n: int, batch: int = 4, seed: int = 0) -> DataLoader:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # three classes a linear model can learn
    return DataLoader(TensorDataset(x, y), batch_size=batch)


class Verbose(Trainer):
    """Returns everything a user might: logits, predictions, an embedding, scalars, a string."""

    seen_alive: list[int]

    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        logits = self.model(x)
        return {
            "loss": nn.functional.cross_entropy(logits, y),
            "acc": (logits.argmax(1) == y).float().mean(),
            "logits": logits,
            "pred": logits.argmax(1),
            "embedding": torch.randn(len(x), 64),
            "note": "text",
            "count": 3,
        }

    def test_step(self, batch: Any) -> dict[str, Any]:
        out = self.train_step(batch)
        self.seen_alive.append(_tensors_alive())
        return out


def _verbose_trainer(**kwargs: Any) -> Verbose:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    trainer = Verbose(model, "cpu", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), log_bar=False, **kwargs)
    trainer.seen_alive = []
    return trainer


def _alive_after(steps: int, **kwargs: Any) -> int:
    trainer = _verbose_trainer(**kwargs)
    trainer.run(1, _classification(4 * steps), _classification(4))
    return trainer.seen_alive[-1]  # during validation: the training epoch's outputs are all in


@pytest.mark.parametrize("log_every_n_steps", [5, 50])
def test_tensors_alive_do_not_grow_with_the_number_of_steps(log_every_n_steps: int) -> None:
    _alive_after(10, log_every_n_steps=log_every_n_steps)  # warm-up: lazily created module-level tensors
    short = _alive_after(10, log_every_n_steps=log_every_n_steps)
    long = _alive_after(100, log_every_n_steps=log_every_n_steps)
    assert long == short, f"{long - short} more tensors alive after 100 steps than after 10"


def test_the_count_sees_retained_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measure above would catch the old behaviour (every non-scalar output kept)."""
    kept: list[torch.Tensor] = []
    original = MetricAccumulator.add

    def keeping(self: MetricAccumulator, outputs: Any, batch_size: int, step: int) -> None:
        kept.extend(v.detach() for v in outputs.values() if isinstance(v, torch.Tensor) and v.numel() > 1)
        original(self, outputs, batch_size, step)

    monkeypatch.setattr(MetricAccumulator, "add", keeping)
    short = _alive_after(10, log_every_n_steps=5)
    assert _alive_after(100, log_every_n_steps=5) - short >= 3 * 100


def test_pending_scalars_are_bounded_even_with_a_huge_log_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "MAX_PENDING_STEPS", 8)
    short = _alive_after(20, log_every_n_steps=10**6)
    long = _alive_after(100, log_every_n_steps=10**6)
    assert long - short <= 2 * 8  # at most one batch of pending (loss, acc) tensors more, never 80 steps' worth


def test_epoch_means_are_exact_after_pending_values_were_read_early(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "MAX_PENDING_STEPS", 3)
    acc = MetricAccumulator("train")
    values = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    sizes = [4, 4, 4, 4, 4, 4, 2]
    for step, (value, size) in enumerate(zip(values, sizes), start=1):
        acc.add({"loss": torch.tensor(value), "logits": torch.ones(size, 3)}, size, step)
    flushed = acc.flush()
    assert flushed.values["loss"] == tuple(values) and flushed.steps == tuple(range(1, 8))
    total, weight = acc.sums()["loss"]
    assert total / weight == pytest.approx(sum(v * n for v, n in zip(values, sizes)) / sum(sizes))
    assert set(acc.sums()) == {"loss"}  # the non-scalar outputs left nothing behind


# -- torchmetrics ---------------------------------------------------------------------------------


class F1Trainer(Trainer):
    """The documented pattern: one Metric per phase, updated in the step, returned as an object."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_f1 = MulticlassF1Score(3, average="macro", validate_args=False).to(self.device)
        self.valid_f1 = self.train_f1.clone()
        self.valid_preds: list[torch.Tensor] = []
        self.valid_targets: list[torch.Tensor] = []

    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        logits = self.model(x)
        self.train_f1.update(logits, y)
        return {"loss": nn.functional.cross_entropy(logits, y), "f1": self.train_f1}

    def test_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        logits = self.model(x)
        self.valid_f1.update(logits, y)
        self.valid_preds.append(logits.argmax(1))
        self.valid_targets.append(y)
        return {"loss": nn.functional.cross_entropy(logits, y), "f1": self.valid_f1}


def _f1_trainer(cls: type = F1Trainer, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    return cls(model, "cpu", optimizer=torch.optim.SGD(model.parameters(), lr=0.5), log_bar=False, **kwargs)


def test_a_torchmetrics_f1_is_computed_over_the_whole_epoch_not_averaged_per_batch() -> None:
    from torchmetrics.functional.classification import multiclass_f1_score

    trainer = _f1_trainer()
    trainer.run(2, _classification(64), _classification(40, batch=3, seed=1))
    # validation of the last epoch: every batch's predictions, scored at once
    preds, targets = torch.cat(trainer.valid_preds[-14:]), torch.cat(trainer.valid_targets[-14:])
    expected = float(multiclass_f1_score(preds, targets, num_classes=3, average="macro"))
    assert trainer.epoch_metrics["valid/f1"] == pytest.approx(expected, abs=1e-6)
    per_batch = [
        float(multiclass_f1_score(p, t, num_classes=3, average="macro"))
        for p, t in zip(trainer.valid_preds[-14:], trainer.valid_targets[-14:])
    ]
    assert abs(sum(per_batch) / len(per_batch) - expected) > 1e-3  # a batch mean would be wrong here
    assert 0.0 < trainer.epoch_metrics["train/f1"] <= 1.0
    assert [("train/f1" in h, "valid/f1" in h) for h in trainer.history] == [(True, True)] * 2
    # the metrics were reset after each epoch: epoch 2's state holds nothing from epoch 1
    assert int(trainer.train_f1.tp.sum() + trainer.train_f1.fn.sum()) == 0


def test_the_monitored_metric_may_be_a_torchmetric() -> None:
    trainer = _f1_trainer(monitor="valid/f1", monitor_mode="max")
    trainer.run(3, _classification(32), _classification(20, seed=1))
    values = [h["valid/f1"] for h in trainer.history]
    assert trainer.best["value"] == max(values) and trainer.best["metric"] == "valid/f1"


def test_torchmetrics_updates_cause_no_host_sync_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    counts: collections.Counter[str] = collections.Counter()
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *args: Any, _name: str = name, _orig: Any = original, **kw: Any) -> Any:
            counts[_name] += 1
            return _orig(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def conversions(steps: int) -> collections.Counter[str]:
        trainer = _f1_trainer(log_every_n_steps=10**6)
        loader = list(_classification(4 * steps))  # a list: DataLoader's own iterator calls .item()
        counts.clear()
        trainer.run(1, loader)
        return collections.Counter(counts)

    assert conversions(40) == conversions(8)  # conversions happen at epoch end only, not per step


def test_one_metric_object_shared_by_overlapping_phases_is_refused() -> None:
    """Validation inside a training epoch (every N steps) must not mix into the training metric."""
    f1 = MulticlassF1Score(3)
    f1.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    train, valid = MetricAccumulator("train"), MetricAccumulator("valid")
    train.add({"f1": f1}, 4, 1)
    with pytest.raises(ValueError, match=r"also in use in the train phase.*metric\.clone\(\)"):
        valid.add({"f1": f1}, 4, 1)
    train.compute_metrics()  # the training phase is done with it: validation may now use it
    valid.add({"f1": f1}, 4, 1)


def test_phases_that_follow_each_other_may_share_one_metric_object() -> None:
    class Shared(F1Trainer):
        def test_step(self, batch: Any) -> dict[str, Any]:
            out = super().test_step(batch)
            self.train_f1.update(self.model(batch[0]), batch[1])
            return {**out, "f1": self.train_f1}

    trainer = _f1_trainer(Shared)
    trainer.run(1, _classification(16), _classification(12, seed=1))
    assert trainer.epoch_metrics["valid/f1"] == pytest.approx(float(trainer.valid_f1.compute()))


def test_a_new_metric_object_every_step_is_refused() -> None:
    class Fresh(F1Trainer):
        def train_step(self, batch: Any) -> dict[str, Any]:
            out = super().train_step(batch)
            return {**out, "f1": MulticlassF1Score(3)}

    with pytest.raises(ValueError, match="a different torchmetrics object under 'f1'.*create each Metric once"):
        _f1_trainer(Fresh).run(1, _classification(8))


def test_vector_and_dict_results_are_named_and_matrices_are_skipped_with_a_warning() -> None:
    acc = MetricAccumulator("valid")
    per_class = MulticlassF1Score(3, average=None)
    collection = torchmetrics.MetricCollection(
        {"f1": MulticlassF1Score(3), "acc": torchmetrics.Accuracy("multiclass", num_classes=3)}
    )
    matrix = MulticlassConfusionMatrix(3)
    preds, target = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])
    for metric in (per_class, collection, matrix):
        metric.update(preds, target)
    acc.add({"loss": torch.tensor(1.0), "per_class": per_class, "c": collection, "cm": matrix}, 4, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = acc.compute_metrics()
    expected = {"per_class/0": 1.0, "per_class/1": 2 / 3, "per_class/2": 2 / 3, "c/f1": 7 / 9, "c/acc": 0.75}
    assert result == pytest.approx(expected)
    assert any("'cm' has shape (3, 3)" in str(w.message) for w in caught)


def test_recorded_scalars_keep_no_graph_and_read_back_their_values() -> None:
    """What an accumulator keeps of a step's loss: its value, not its graph (nor its gradient)."""
    acc = metrics_module.MetricAccumulator("train")
    weight = torch.tensor([2.0, 3.0], requires_grad=True)
    loss = (weight * weight).sum()  # 13, with a graph back to weight
    acc.add({"loss": loss, "half": loss / 2}, batch_size=4, step=1)
    kept = [values[0] for values in acc._pending.values()]
    assert all(not v.requires_grad and v.grad_fn is None for v in kept)
    loss.backward()  # the step goes on as usual
    flushed = acc.flush()
    assert flushed.values == {"loss": (13.0,), "half": (6.5,)} and flushed.means == {"loss": 13.0, "half": 6.5}


def test_a_flush_reads_scalars_of_every_one_element_shape_and_numbers_in_order() -> None:
    acc = MetricAccumulator("train")
    acc.add({"a": torch.tensor(1.0), "b": torch.tensor([2.0])}, 2, 1)  # 0-dim and (1,)
    acc.add({"a": torch.tensor(3.0), "b": torch.tensor([[4.0]])}, 2, 2)  # and (1, 1)
    acc.add_value("a", 5.0)  # a number among the tensors
    acc.add({"c": torch.tensor(7, dtype=torch.int64)}, 1, 3)
    flushed = acc.flush()
    assert flushed.values == {"a": (1.0, 3.0, 5.0), "b": (2.0, 4.0), "c": (7.0,)}
    assert all(type(v) is float for vs in flushed.values.values() for v in vs)
    assert flushed.means["a"] == pytest.approx((1.0 * 2 + 3.0 * 2 + 5.0) / 5)
    acc.add({"b": torch.tensor([[1.0], [2.0]]).sum(0)}, 1, 4)  # all (1,): stacked as (n, 1), flattened
    acc.add({"b": torch.tensor([3.0])}, 1, 5)
    assert acc.flush().values == {"b": (3.0, 3.0)}
