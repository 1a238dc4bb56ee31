"""Reading what others wrote: schema version 1, lis2 snapshots, plain ``torch.save`` dicts,
and damaged files of every kind (each one a ``CheckpointCorruptError`` naming the file)."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from zae_trainer.addons import StateManagerAddon
from zae_trainer.addons.checkpoint import (
    GLOBAL_CONFIG,
    MODEL,
    TRAIN_INFO,
    CheckpointCorruptError,
    CheckpointUnsafeError,
    read_checkpoint,
    read_snapshot,
    read_weights,
)
from zae_trainer.addons.checkpoint.rng import capture_rng
from zae_trainer.testing import TinyRegressionTrainer, tiny_loader, tiny_trainer


def trainer_at(folder: Path, **settings: Any) -> Any:
    return tiny_trainer(TinyRegressionTrainer.add_on(StateManagerAddon), save_path=str(folder), **settings)


def trained(folder: Path, epochs: int = 2, **settings: Any) -> Any:
    trainer = trainer_at(folder, **settings)
    trainer.run(epochs, tiny_loader(16), tiny_loader(8))
    return trainer


def same_params(a: Any, b: Any) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.raw_model.state_dict().values(), b.raw_model.state_dict().values()))


# -- schema version 1 ------------------------------------------------------------------------
def test_a_version_1_checkpoint_still_loads(tmp_path: Path) -> None:
    source = trained(tmp_path / "run")
    state = source.state_dict()
    pc = source.progress_checker
    v1 = {  # the layout version 1 wrote: per-step losses and a training_info block included
        "format": "zae_trainer.checkpoint",
        "format_version": 1,
        "model": state["model"],
        "model_config": None,
        "optimizer": state["optimizer"],
        "scheduler": None,
        "progress": state["progress"],
        "history": state["history"],
        "loss_history": {"train": [0.5] * pc.step, "test": [0.25] * 4},
        "best": state["best"],
        "addons": {},
        "rng": capture_rng(),
        "data_position": {"batch_in_epoch": 0, "epoch_start": None, "generators": {}, "loader_state": None},
        "config": {"lr": 0.05},
        "trainer_settings": {"monitor": "valid/loss", "monitor_mode": "min", "accumulate_grad_batches": 1,
                             "gradient_clip": 0.0, "log_every_n_steps": 2, "world_size": 1},
        "training_info": {"epochs_run": pc.epoch, "global_step": pc.step, "best_loss": state["best"]["value"],
                          "best_epoch": state["best"]["epoch"], "monitor": "valid/loss"},
        "versions": {"torch": str(torch.__version__)},
        "saved_at": {"unix": time.time(), "iso": "2026-01-01T00:00:00+00:00"},
        "reasons": ["last"],
    }
    path = tmp_path / "v1.ckpt"
    torch.save(v1, path)
    fresh = trainer_at(tmp_path / "fresh")
    fresh.load_state(path)
    assert same_params(fresh, source) and fresh.progress_checker == source.progress_checker
    assert fresh.history == source.history and fresh.best == source.best
    assert fresh.optimizer.state_dict()["param_groups"] == source.optimizer.state_dict()["param_groups"]
    continued = trainer_at(tmp_path / "continued", resume=str(path))
    continued.run(3, tiny_loader(16), tiny_loader(8))  # the same 3-epoch run: one epoch left
    assert continued.progress_checker.epoch == 3 and len(continued.history) == 3
    snap = read_snapshot(str(path))
    assert snap["training_info"]["epochs_run"] == 2 and snap["training_info"]["best_loss"] == source.best["value"]


# -- lis2 snapshots --------------------------------------------------------------------------
def test_read_snapshot_gives_lis2_layout(tmp_path: Path) -> None:
    trainer = trained(tmp_path, config={"lr": 0.05, "name": "tiny"}, model_config={"width": 3})
    snap = read_snapshot(str(tmp_path / "last.ckpt"), layout="lis2")
    assert set(snap) == {MODEL, TRAIN_INFO, GLOBAL_CONFIG} == {"MODEL", "TRAIN_INFO", "GLOBAL_CONFIG"}
    assert snap[MODEL]["config"] == {"width": 3}
    assert torch.equal(snap[MODEL]["state"]["weight"], trainer.raw_model.weight.detach())
    assert set(snap[TRAIN_INFO]) == {"epochs_run", "best_loss", "optimizer", "scheduler"}
    assert snap[TRAIN_INFO]["epochs_run"] == 2 and snap[TRAIN_INFO]["best_loss"] == trainer.best["value"]
    assert snap[TRAIN_INFO]["optimizer"]["param_groups"][0]["lr"] == 0.05
    assert snap[GLOBAL_CONFIG]["name"] == "tiny"
    with pytest.raises(ValueError, match="'zae_trainer' or 'lis2'"):
        read_snapshot(str(tmp_path / "last.ckpt"), layout="lis3")


def test_a_lis2_snapshot_resumes_and_loads_as_weights(tmp_path: Path) -> None:
    source = trained(tmp_path / "run")
    snapshot = read_snapshot(str(tmp_path / "run" / "last.ckpt"), layout="lis2")
    snapshot[TRAIN_INFO]["global_step"] = source.progress_checker.step
    path = tmp_path / "snapshot.pt"
    torch.save(snapshot, path)  # what lis2 writes: a torch.save of that dict
    resumed = trainer_at(tmp_path / "resumed")
    resumed.load_state(path)
    assert same_params(resumed, source) and resumed.progress_checker.epoch == 2
    assert resumed.progress_checker.step == source.progress_checker.step
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["momentum_buffer"]
                       if "momentum_buffer" in resumed.optimizer.state_dict()["state"].get(0, {}) else torch.zeros(1),
                       source.optimizer.state_dict()["state"][0]["momentum_buffer"]
                       if "momentum_buffer" in source.optimizer.state_dict()["state"].get(0, {}) else torch.zeros(1))
    weights_only = trainer_at(tmp_path / "w")
    weights_only.apply_weights(path)
    assert same_params(weights_only, source) and weights_only.progress_checker.epoch == 0
    assert read_snapshot(str(path), layout="lis2")[TRAIN_INFO]["epochs_run"] == 2


# -- plain torch.save dicts --------------------------------------------------------------------
def test_plain_torch_save_dicts_resume_or_load_weights(tmp_path: Path) -> None:
    source = trained(tmp_path / "run")
    plain = tmp_path / "plain.pt"
    torch.save({"model": source.raw_model.state_dict(), "optimizer": source.optimizer.state_dict(), "epoch": 2}, plain)
    resumed = trainer_at(tmp_path / "a")
    with pytest.warns(RuntimeWarning, match="no step count"):
        resumed.load_state(plain)
    assert same_params(resumed, source) and resumed.progress_checker.epoch == 2
    tutorial = tmp_path / "tutorial.pt"  # PyTorch tutorial spelling
    torch.save({"model_state_dict": source.raw_model.state_dict(),
                "optimizer_state_dict": source.optimizer.state_dict(), "epoch": 2, "step": 4}, tutorial)
    other = trainer_at(tmp_path / "b")
    other.load_state(tutorial)
    assert same_params(other, source) and other.progress_checker.step == 4
    bare = tmp_path / "bare.pt"
    torch.save(source.raw_model.state_dict(), bare)
    weights = trainer_at(tmp_path / "c")
    weights.apply_weights(bare)
    assert same_params(weights, source)
    with pytest.raises(CheckpointCorruptError, match=r"plain state_dict of 2 tensors.*apply_weights"):
        weights.load_state(bare)  # weights alone cannot resume
    no_optimizer = tmp_path / "model_only.pt"
    torch.save({"model": source.raw_model.state_dict(), "epoch": 2}, no_optimizer)
    with pytest.raises(CheckpointCorruptError, match=r"dict with keys 'model', 'epoch'.*not one that holds enough"):
        weights.load_state(no_optimizer)
    weights.apply_weights(no_optimizer)


def test_unsafe_foreign_file_is_refused_naming_what_it_found_and_how_to_convert(tmp_path: Path) -> None:
    from argparse import Namespace

    path = tmp_path / "lis2_with_object.pt"
    model = torch.nn.Linear(3, 1)
    torch.save({MODEL: {"config": None, "state": model.state_dict()}, GLOBAL_CONFIG: Namespace(lr=0.1)}, path)
    trainer = trainer_at(tmp_path / "t")
    for load in (trainer.load_state, trainer.apply_weights):
        with pytest.raises(CheckpointUnsafeError) as info:
            load(path)
        text = str(info.value)
        assert "lis2_with_object.pt" in text and "argparse.Namespace" in text and "To convert" in text


# -- damaged files: always CheckpointCorruptError, naming the file ------------------------------
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_random_bytes_always_give_checkpoint_corrupt_error(tmp_path: Path) -> None:
    rng = random.Random(12345)
    valid = tmp_path / "valid.ckpt"
    torch.save({"format": "zae_trainer.checkpoint", "model": {"w": torch.zeros(3)}}, valid)
    good = valid.read_bytes()
    heads = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", good[:64]]
    for i in range(300):
        head = heads[i % len(heads)]
        if i % 7 == 6:  # a real file with some bytes flipped
            data = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            body = bytes(data)
        else:
            body = head + bytes(rng.randrange(256) for _ in range(rng.randint(0, 600)))
        path = tmp_path / f"garbage{i}.ckpt"
        path.write_bytes(body)
        for read in (read_checkpoint, read_weights):
            try:
                read(str(path))
            except CheckpointCorruptError as exc:
                assert f"garbage{i}.ckpt" in str(exc)
            else:  # a flipped byte inside a tensor's data still parses: that is not damage we can see
                assert i % 7 == 6


def test_damaged_safetensors_and_json_give_checkpoint_corrupt_error(tmp_path: Path) -> None:
    trained(tmp_path / "run", epochs=1, save_format="safetensors")
    original = tmp_path / "run" / os.readlink(tmp_path / "run" / "last")
    rng = random.Random(7)
    damages = {
        "model.safetensors": [b"", b"\x00" * 7, b"\xff" * 16, os.urandom(64)],
        "checkpoint.json": [b"{", b"[]", b'{"format": 3}', json.dumps({"format": "zae_trainer.checkpoint",
                                                                     "model": 1}).encode(), b"\xff\xfe"],
    }
    for name, contents in damages.items():
        for n, data in enumerate(contents):
            copy = tmp_path / f"{name}-{n}"
            shutil.copytree(original, copy)
            (copy / name).write_bytes(data)
            with pytest.raises(CheckpointCorruptError) as info:
                read_checkpoint(str(copy))
            assert str(copy) in str(info.value) or name in str(info.value)
    truncated = tmp_path / "truncated"
    shutil.copytree(original, truncated)
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[: rng.randint(9, len(blob) - 1)])
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        read_checkpoint(str(truncated))


def test_resume_latest_skips_a_garbage_newest_checkpoint_with_a_warning(tmp_path: Path) -> None:
    trained(tmp_path, epochs=2, keep_last=5)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    newest, previous = manifest["checkpoints"][-1], manifest["checkpoints"][-2]
    garbage = random.Random(3).randbytes(newest["size"])  # same size: only parsing can tell
    (tmp_path / newest["name"]).write_bytes(garbage)
    resumed = trainer_at(tmp_path)
    with pytest.warns(RuntimeWarning, match=f"skipping damaged checkpoint.*{newest['name']}"):
        loaded = resumed.load_state("latest")
    assert loaded == str(tmp_path / previous["name"]) and resumed.progress_checker.epoch == previous["epoch"]
