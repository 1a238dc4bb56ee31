"""zae-engine's checkpoint folder (model.ckpt / model.safetensor, optimizer.zae, scheduler.zae).

The folders here are written the way zae-engine's ``StateManagerAddon`` writes them:
``torch.save`` / ``safetensors`` for the weights and plain ``pickle.dump`` for the optimizer
and scheduler state. The core state manager must load such a folder or say what it found;
the safe reader must never execute what a pickle names.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from core_helpers import TinyTrainer, tiny_loader, tiny_trainer
from zae_trainer.addons import StateManagerAddon
from zae_trainer.addons.checkpoint.errors import CheckpointCorruptError, CheckpointUnsafeError
from zae_trainer.addons.checkpoint.zae_engine_folder import convert, find, read_state, write


def _trained_objects() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    torch.manual_seed(1)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        model(torch.randn(4, 3)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler


def _zae_engine_writes(folder: Path, save_format: str = "ckpt") -> tuple[nn.Module, torch.optim.Optimizer, object]:
    """What zae-engine 0.7.6's StateManagerAddon.save_state() writes, line for line."""
    model, optimizer, scheduler = _trained_objects()
    folder.mkdir(parents=True, exist_ok=True)
    if save_format == "ckpt":
        torch.save(model.state_dict(), folder / "model.ckpt")
    else:
        safetensors.torch.save_file(model.state_dict(), str(folder / "model.safetensor"))
    with open(folder / "optimizer.zae", "wb") as f:
        pickle.dump(optimizer.state_dict(), f)
    with open(folder / "scheduler.zae", "wb") as f:
        pickle.dump(scheduler.state_dict(), f)
    return model, optimizer, scheduler


def _state_trainer(folder: Path, **settings: object) -> TinyTrainer:
    cls = TinyTrainer.add_on(StateManagerAddon)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return cls(model, "cpu", "train", optimizer, scheduler, log_bar=False, handle_signals=False,
               save_path=str(folder), **settings)


@pytest.mark.parametrize("save_format", ["ckpt", "safetensor"])
def test_core_load_state_on_a_zae_engine_folder_loads_weights_optimizer_and_scheduler(tmp_path: Path, save_format: str) -> None:
    saved_model, saved_opt, saved_sched = _zae_engine_writes(tmp_path / "run", save_format)
    trainer = _state_trainer(tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="zae-engine folders record no progress"):
        trainer.load_state()  # "latest": the manifest lists nothing, the folder is zae-engine's
    assert torch.equal(trainer.model.weight, saved_model.weight)
    exp_avg = trainer.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, saved_opt.state_dict()["state"][0]["exp_avg"])
    assert trainer.scheduler.last_epoch == saved_sched.last_epoch == 3
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**3)


def test_core_load_state_on_the_model_file_itself_is_not_called_corrupt(tmp_path: Path) -> None:
    saved_model, _, _ = _zae_engine_writes(tmp_path / "run")
    trainer = _state_trainer(tmp_path / "elsewhere")
    with pytest.warns(RuntimeWarning, match="loaded zae-engine checkpoint folder"):
        trainer.load_state(str(tmp_path / "run" / "model.ckpt"))
    assert torch.equal(trainer.model.weight, saved_model.weight)
    assert trainer.scheduler.last_epoch == 3


def test_resume_latest_over_a_zae_engine_folder_continues_from_its_weights(tmp_path: Path) -> None:
    saved_model, _, _ = _zae_engine_writes(tmp_path / "run")
    trainer = _state_trainer(tmp_path / "run", resume="latest")
    with pytest.warns(RuntimeWarning, match="continues at epoch 1"):
        trainer.run(1, tiny_loader())
    after = trainer.model.weight.detach()
    # the run started from the saved weights: 3 Adam steps at lr 0.05*0.5**3 move each by < 0.02
    assert (after - saved_model.weight).abs().max() < 0.02
    assert not torch.equal(after, saved_model.weight)
    assert trainer.scheduler.last_epoch == 4  # restored 3, then one epoch


def test_a_folder_with_optimizer_state_but_no_model_is_refused_naming_what_it_holds(tmp_path: Path) -> None:
    _zae_engine_writes(tmp_path / "run")
    os.remove(tmp_path / "run" / "model.ckpt")
    trainer = _state_trainer(tmp_path / "run", resume="latest")
    with pytest.raises(CheckpointCorruptError, match=r"optimizer\.zae, scheduler\.zae, but no model file"):
        trainer.run(1, tiny_loader())


class _Planted:
    """Unpickling this calls open() on a sentinel path: the code execution a safe reader refuses."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.target, "w"))


def test_a_pickle_that_names_code_is_refused_unread_and_convert_needs_consent(tmp_path: Path) -> None:
    _zae_engine_writes(tmp_path / "run")
    sentinel = tmp_path / "executed"
    with open(tmp_path / "run" / "optimizer.zae", "wb") as f:
        pickle.dump({"state": {}, "param_groups": [], "planted": _Planted(str(sentinel))}, f)
    trainer = _state_trainer(tmp_path / "run")
    with pytest.raises(CheckpointUnsafeError, match=r"names (builtins|io)\.open.*convert\("):
        trainer.load_state(str(tmp_path / "run"))
    assert not sentinel.exists()
    with pytest.raises(PermissionError, match="trust_pickles=True"):
        convert(str(tmp_path / "run"))
    assert not sentinel.exists()


def test_garbage_in_a_zae_file_is_called_damaged_not_unsafe(tmp_path: Path) -> None:
    (tmp_path / "optimizer.zae").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointCorruptError, match="truncated or damaged") as info:
        read_state(str(tmp_path / "optimizer.zae"))
    assert not isinstance(info.value, CheckpointUnsafeError)


def test_convert_rewrites_trusted_pickles_as_torch_files(tmp_path: Path) -> None:
    _, saved_opt, _ = _zae_engine_writes(tmp_path / "run")
    converted = convert(str(tmp_path / "run"), trust_pickles=True)
    assert sorted(os.path.basename(p) for p in converted) == ["optimizer.zae", "scheduler.zae"]
    assert (tmp_path / "run" / "optimizer.zae.orig").exists()
    state = torch.load(tmp_path / "run" / "optimizer.zae", weights_only=True)
    assert torch.equal(state["state"][0]["exp_avg"], saved_opt.state_dict()["state"][0]["exp_avg"])


def test_write_produces_zae_engines_layout_that_plain_pickle_reads_back(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trained_objects()
    written = write(str(tmp_path), model.state_dict(), optimizer.state_dict(), scheduler.state_dict(), "safetensor")
    assert sorted(os.listdir(tmp_path)) == ["model.safetensor", "optimizer.zae", "scheduler.zae"]
    assert len(written) == 3
    with open(tmp_path / "optimizer.zae", "rb") as f:  # what zae-engine's load_state does
        state = pickle.load(f)
    assert torch.equal(state["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    weights = safetensors.torch.load_file(str(tmp_path / "model.safetensor"))
    assert torch.equal(weights["weight"], model.weight)
    found = find(str(tmp_path))
    assert found is not None and found.model == str(tmp_path / "model.safetensor")


def test_a_zae_trainer_checkpoint_is_not_mistaken_for_a_zae_engine_folder(tmp_path: Path) -> None:
    trainer = tiny_trainer(TinyTrainer.add_on(StateManagerAddon), save_path=str(tmp_path), save_format="safetensors")
    trainer.run(1, tiny_loader())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "zae-engine folder" warning
        path = trainer.load_state("latest")
    assert path is not None and os.path.isdir(path)
