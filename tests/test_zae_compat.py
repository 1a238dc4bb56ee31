"""Code written for ``zae_engine.trainer`` runs on zae_trainer with only the import changed.

Each test is written the way zae-engine's README and users write it: positional
``(model, device, mode, optimizer, scheduler)``, ``torch.device`` objects, ``run(n_epoch=...,
loader=...)``, reading ``log_train`` / ``log_test``, ``weight_buffer``, ``apply_weights``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader, Dataset

from zae_trainer.compat import Trainer  # was: from zae_engine.trainer import Trainer
from zae_trainer.compat.addons import AddOnBase  # was: from zae_engine.trainer.addons import AddOnBase


class DummyDataset(Dataset):
    def __init__(self, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = torch.rand(size, 10, generator=g)
        self.labels = (self.data.mean(dim=1) > 0.5).long()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int):
        return self.data[idx], self.labels[idx]


class MyTrainer(Trainer):
    def train_step(self, batch):
        data, labels = batch
        outputs = self.model(data)
        loss = nn.CrossEntropyLoss()(outputs, labels)
        return {"loss": loss}

    def test_step(self, batch):
        data, labels = batch
        outputs = self.model(data)
        return {"loss": nn.CrossEntropyLoss()(outputs, labels), "output": outputs.argmax(1)}


def _setup(scheduler: bool = True):
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = nn.Linear(10, 2)
    optimizer = optim.Adam(model.parameters(), lr=0.01)
    sched = optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9) if scheduler else None
    return model, device, optimizer, sched


def test_readme_style_keyword_construction_and_run() -> None:
    model, device, optimizer, scheduler = _setup(scheduler=False)
    trainer = MyTrainer(model=model, device=device, mode="train", optimizer=optimizer, scheduler=scheduler,
                        log_bar=False)
    train_loader = DataLoader(DummyDataset(200), batch_size=32, shuffle=True)
    trainer.run(n_epoch=3, loader=train_loader)
    assert trainer.progress_checker.get_epoch() == 4  # 1-based epoch in progress, as zae-engine
    assert trainer.progress_checker.get_step() == 3 * 7 + 1
    assert trainer.batch_size == 32 and trainer.valid_batch_size == 0


def test_positional_construction_with_all_zae_keywords() -> None:
    model, device, optimizer, scheduler = _setup()
    trainer = MyTrainer(model, device, "train", optimizer, scheduler, log_bar=False, scheduler_step_on_batch=False,
                        gradient_clip=1.0)
    trainer.run(2, DataLoader(DummyDataset(64), batch_size=16), DataLoader(DummyDataset(32), batch_size=16))
    assert trainer.scheduler.last_epoch == 2
    assert trainer.valid_batch_size == 16
    # per-step values of the last epoch, as zae-engine lists (floats here, flushed at epoch end)
    assert len(trainer.log_train["loss"]) == 4 and len(trainer.log_test["loss"]) == 2
    assert len(trainer.log_test["output"]) == 2 and trainer.log_test["output"][0].shape == (16,)
    assert len(trainer.get_loss_history("train")) == 8 and len(trainer.get_loss_history("test")) == 4
    # zae-engine's train_metrics/test_metrics hold what metric_on_epoch_end returns (nothing here);
    # the epoch means are the core's epoch_metrics
    assert trainer.train_metrics == {} and trainer.test_metrics == {}
    assert set(trainer.epoch_metrics) == {"train/loss", "valid/loss"}


def test_check_better_keeps_a_copy_of_the_best_weights_that_does_not_follow_training() -> None:
    model, device, optimizer, scheduler = _setup(scheduler=False)
    trainer = MyTrainer(model, device, "train", optimizer, scheduler, log_bar=False)
    assert isinstance(trainer.weight_buffer, defaultdict)
    assert trainer.check_better(cur_epoch=1, cur_loss=0.5) is True
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.run(1, DataLoader(DummyDataset(64), batch_size=16))  # training changes the live weights
    assert trainer.check_better(cur_epoch=2, cur_loss=0.9) is False
    stored = trainer.weight_buffer["weight"][0]
    assert all(torch.equal(stored[k], snapshot[k]) for k in snapshot)  # zae-engine's would follow training
    assert not torch.equal(model.weight, snapshot["weight"])
    trainer.apply_weights()
    assert torch.equal(model.weight, snapshot["weight"])


def test_apply_weights_with_a_missing_file_raises_instead_of_printing(tmp_path: Path) -> None:
    model, device, optimizer, scheduler = _setup()
    trainer = MyTrainer(model, device, "train", optimizer, scheduler, log_bar=False)
    (tmp_path / "other.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no file .*missing\.pth.*other\.pth"):
        trainer.apply_weights(str(tmp_path / "missing.pth"))
    with pytest.raises(RuntimeError, match="no best weights in memory yet"):
        trainer.apply_weights()


def test_save_model_then_apply_weights_round_trip(tmp_path: Path) -> None:
    model, device, optimizer, scheduler = _setup()
    trainer = MyTrainer(model, device, "train", optimizer, scheduler, log_bar=False)
    path = tmp_path / "dummy_model.pth"
    trainer.save_model(str(path))
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    trainer.apply_weights(str(path))
    assert torch.equal(model.weight, saved)


def test_toggle_log_reset_to_device_to_cpu_and_print_log() -> None:
    model, device, optimizer, scheduler = _setup()
    trainer = MyTrainer(model, device, "train", optimizer, scheduler, log_bar=False)
    trainer.toggle()
    assert trainer.mode == "test"
    trainer.toggle("train")
    assert trainer.mode == "train"
    x, y = trainer._to_device(torch.ones(2), torch.zeros(2))
    assert x.device == device and trainer._to_device(x=torch.ones(1))["x"].device == device
    assert trainer._to_cpu(torch.ones(1, requires_grad=True)).requires_grad is False
    trainer.run(1, DataLoader(DummyDataset(32), batch_size=16))
    report = trainer.print_log(cur_batch=2, num_batch=2)
    assert report["Batch"] == "2/2" and float(report["loss"]) > 0 and report["LR"] == "9.000e-03"  # StepLR(gamma=0.9) after one epoch
    trainer.log_reset()
    assert len(trainer.log_train["loss"]) == 0


def test_run_epoch_and_run_batch_can_be_called_directly() -> None:
    model, device, optimizer, scheduler = _setup()
    trainer = MyTrainer(model, device, "train", optimizer, scheduler, log_bar=False)
    batch = next(iter(DataLoader(DummyDataset(16), batch_size=16)))
    before = model.weight.detach().clone()
    trainer.run_batch(batch)
    assert not torch.equal(before, model.weight) and trainer.progress_checker.step == 1
    trainer.toggle("test")
    trainer.run_epoch(DataLoader(DummyDataset(32), batch_size=16))
    assert trainer.progress_checker.step == 1


def test_inference_returns_the_output_key_per_batch() -> None:
    model, device, optimizer, scheduler = _setup()
    trainer = MyTrainer(model, device, "train", optimizer, scheduler, log_bar=False)
    outputs = trainer.inference(DataLoader(DummyDataset(40), batch_size=16))
    assert [o.shape[0] for o in outputs] == [16, 16, 8]


def test_zae_style_custom_addon_applies_with_add_on() -> None:
    class EpochCounterAddon(AddOnBase):
        addon_case = 0

        @classmethod
        def apply(cls, base_cls):
            class EpochCounter(base_cls):
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    self.epochs_seen = 0

                def run_epoch(self, loader, **kwargs):
                    super().run_epoch(loader, **kwargs)
                    if self.mode == "train":
                        self.epochs_seen += 1

            return EpochCounter

    model, device, optimizer, scheduler = _setup()
    # the core loop runs its own epochs: an override of run_epoch is called only when called directly,
    # and constructing such a trainer says so
    with pytest.warns(UserWarning, match=r"overrides run_epoch\(\), which the zae_trainer loop does not call"):
        trainer = MyTrainer.add_on(EpochCounterAddon)(model, device, "train", optimizer, scheduler, log_bar=False)
    trainer.run(n_epoch=2, loader=DataLoader(DummyDataset(32), batch_size=16))
    assert trainer.epochs_seen == 0
    trainer.run_epoch(DataLoader(DummyDataset(32), batch_size=16))
    assert trainer.epochs_seen == 1
