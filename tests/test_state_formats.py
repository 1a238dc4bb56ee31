"""StateManagerAddon: what a checkpoint holds, both formats, safe loading, errors that teach."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from core_helpers import TinyTrainer, tiny_loader
from zae_trainer import Trainer
from zae_trainer.addons import StateManagerAddon
from zae_trainer.addons.checkpoint import (
    FORMAT_VERSION,
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointUnsafeError,
    read_checkpoint,
    read_snapshot,
)

FORMATS = ["ckpt", "safetensors"]


def make(save_path, model=None, cls=TinyTrainer, **settings):
    torch.manual_seed(0)
    model = model if model is not None else nn.Linear(3, 1)
    settings.setdefault("log_bar", False)
    settings.setdefault("handle_signals", False)
    return cls.add_on(StateManagerAddon)(
        model, "cpu", "train", torch.optim.Adam(model.parameters(), lr=0.05), None, save_path=str(save_path), **settings
    )


def manifest(folder) -> dict:
    with open(os.path.join(folder, "manifest.json")) as fh:
        return json.load(fh)


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_holds_the_documented_schema(tmp_path, fmt):
    trainer = make(tmp_path, save_format=fmt, config={"lr": 0.05, "name": "tiny"}, model_config={"width": 3})
    trainer.run(2, tiny_loader(), tiny_loader(n=8))
    ckpt = read_checkpoint(os.path.join(tmp_path, manifest(tmp_path)["latest"]))
    assert ckpt["format_version"] == FORMAT_VERSION
    for key in ("model", "optimizer", "scheduler", "progress", "history", "best", "metrics", "addons", "rng",
                "data_position", "config", "model_config", "trainer_settings", "versions", "saved_at", "reasons"):
        assert key in ckpt, key
    for gone in ("loss_history", "training_info"):  # version 1 baggage: per-step losses, repeated progress
        assert gone not in ckpt, gone
    assert ckpt["progress"]["epoch"] == 2 and ckpt["progress"]["step"] == 6
    # seed_everything() earlier in the session adds seed/deterministic to every later trainer's config
    assert {k: v for k, v in ckpt["config"].items() if k not in ("seed", "deterministic")} == {"lr": 0.05, "name": "tiny"}
    assert ckpt["model_config"] == {"width": 3}
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch", "cuda"}
    assert ckpt["versions"]["torch"] == torch.__version__
    assert len(ckpt["history"]) == 2
    for name, value in trainer.raw_model.state_dict().items():
        assert torch.equal(ckpt["model"][name], value)
    saved_opt = ckpt["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(saved_opt, trainer.optimizer.state_dict()["state"][0]["exp_avg"])
    snap = read_snapshot(os.path.join(tmp_path, manifest(tmp_path)["latest"]))
    assert snap["training_info"]["epochs_run"] == 2
    assert snap["training_info"]["best_loss"] == trainer.best["value"]
    assert snap["model_config"] == {"width": 3} and snap["global_config"]["name"] == "tiny"
    assert snap["optimizer_state"]["param_groups"][0]["lr"] == 0.05


def test_safetensors_checkpoint_has_no_pickle_and_plain_tools_read_it(tmp_path):
    trainer = make(tmp_path, save_format="safetensors")
    trainer.run(1, tiny_loader())
    folder = os.path.join(tmp_path, manifest(tmp_path)["latest"])
    # no other tensors here (RNG keys are hex text in the JSON), so no state.safetensors
    assert sorted(os.listdir(folder)) == ["checkpoint.json", "model.safetensors", "optimizer.safetensors"]
    weights = load_file(os.path.join(folder, "model.safetensors"))
    assert torch.equal(weights["weight"], trainer.model.weight.detach())
    opt = load_file(os.path.join(folder, "optimizer.safetensors"))
    assert torch.equal(opt["optimizer.state.0.exp_avg"], trainer.optimizer.state[trainer.model.weight]["exp_avg"])
    with open(os.path.join(folder, "checkpoint.json")) as fh:
        json.load(fh)  # strict JSON
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as fh:
            assert b"\x80\x02" not in fh.read(2) and not zipfile.is_zipfile(fh)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, x):
        return self.head(self.embed(x))


class TiedTrainer(Trainer):
    def train_step(self, batch):
        (x,) = batch
        return {"loss": nn.functional.cross_entropy(self.model(x), x)}

    def test_step(self, batch):
        return self.train_step(batch)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tied_weights_save_and_load_in_both_formats(tmp_path, fmt):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(10)), batch_size=5)
    trainer = make(tmp_path, model=TiedLM(), cls=TiedTrainer, save_format=fmt)
    trainer.run(1, data)
    fresh = make(tmp_path, model=TiedLM(), cls=TiedTrainer, save_format=fmt)
    with torch.no_grad():
        fresh.model.embed.weight.zero_()
    fresh.load_state("latest")
    assert torch.equal(fresh.model.embed.weight, trainer.model.embed.weight)
    assert fresh.model.head.weight is fresh.model.embed.weight  # still tied after loading
    fresh.export_weights(tmp_path / "serve.safetensors")
    plain = load_file(str(tmp_path / "serve.safetensors"))  # other tools read the unique tensor
    assert torch.equal(plain["embed.weight"], trainer.model.embed.weight.detach())


def test_planted_pickle_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    planted = tmp_path / "evil.ckpt"
    torch.save({"format": "zae_trainer.checkpoint", "payload": Exploit()}, planted)
    trainer = make(tmp_path / "ckpts")
    with pytest.raises(CheckpointUnsafeError) as info:
        trainer.load_state(planted)
    assert "evil.ckpt" in str(info.value) and "system" in str(info.value)
    with pytest.raises(CheckpointUnsafeError):
        trainer.apply_weights(planted)
    assert not marker.exists()


def test_missing_file_names_path_and_lists_folder(tmp_path):
    trainer = make(tmp_path)
    trainer.run(1, tiny_loader())
    with pytest.raises(CheckpointNotFoundError) as info:
        trainer.load_state(tmp_path / "nope.ckpt")
    text = str(info.value)
    assert "nope.ckpt" in text and "manifest.json" in text and manifest(tmp_path)["latest"] in text


def test_checkpoint_of_another_model_lists_missing_unexpected_and_reshaped(tmp_path):
    make(tmp_path).run(1, tiny_loader())
    other = nn.Sequential(nn.Linear(3, 1))  # keys "0.weight", "0.bias"
    trainer = make(tmp_path / "b", model=other)
    path = os.path.join(tmp_path, manifest(tmp_path)["latest"])
    with pytest.raises(CheckpointMismatchError) as info:
        trainer.load_state(path)
    text = str(info.value)
    assert "missing keys (2): 0.weight, 0.bias" in text and "unexpected keys (2)" in text and "strict=False" in text
    wide = make(tmp_path / "c", model=nn.Linear(3, 2))
    with pytest.raises(CheckpointMismatchError, match=r"weight: checkpoint \(1, 3\) vs model \(2, 3\)"):
        wide.apply_weights(path)
    with pytest.warns(RuntimeWarning, match="shape mismatches"):
        wide.apply_weights(path, strict=False)


def test_corrupt_file_names_file_and_problem(tmp_path):
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    trainer = make(tmp_path / "ckpts")
    with pytest.raises(CheckpointCorruptError, match=r"garbage\.ckpt.*not a readable checkpoint"):
        trainer.load_state(bad)
    weights_only = tmp_path / "weights.pt"
    torch.save(trainer.model.state_dict(), weights_only)
    with pytest.raises(CheckpointCorruptError, match="plain state_dict.*apply_weights"):
        trainer.load_state(weights_only)


def test_zae_engine_surface_and_spelling(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    cls = TinyTrainer.add_on(StateManagerAddon)
    trainer = cls(model, "cpu", "train", torch.optim.SGD(model.parameters(), lr=0.1), None,
                  save_path=str(tmp_path), save_format="safetensor", log_bar=False)
    assert trainer.get_addon("StateManagerAddon").save_format == "safetensors"
    trainer.run(1, tiny_loader())
    saved = trainer.save_state()
    assert os.path.isdir(saved)
    trainer.save_model(str(tmp_path / "model.safetensor"))
    assert torch.equal(load_file(str(tmp_path / "model.safetensor"))["weight"], model.weight.detach())
    trainer.save_model(str(tmp_path / "model.ckpt"))
    assert torch.equal(torch.load(tmp_path / "model.ckpt", weights_only=True)["bias"], model.bias.detach())
    expected = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    assert trainer.load_state() == saved
    assert torch.equal(model.weight, expected)
    configured = TinyTrainer.add_on(StateManagerAddon(save_path=str(tmp_path / "x"), save_format="ckpt"))
    other = nn.Linear(3, 1)
    t2 = configured(other, "cpu", "train", torch.optim.SGD(other.parameters(), lr=0.1), None, log_bar=False)
    assert t2.get_addon(StateManagerAddon).save_path == str(tmp_path / "x")
    with pytest.raises(ValueError, match="'ckpt' or 'safetensors'"):
        StateManagerAddon(save_path=str(tmp_path), save_format="h5")


class ScriptedValidation(TinyTrainer):
    """Validation loss is whatever the test sets in ``score``: retention becomes predictable."""

    score = 0.0

    def test_step(self, batch):
        return {"loss": torch.tensor(self.score)}


def test_top_k_best_and_last_retention(tmp_path):
    trainer = make(tmp_path, cls=ScriptedValidation, keep_top_k=2, keep_last=1)
    for score in [5.0, 3.0, 4.0, 1.0, 2.0]:
        trainer.score = score
        trainer.run(1, tiny_loader(), tiny_loader(n=8))
    m = manifest(tmp_path)
    kept = {e["name"]: e["value"] for e in m["checkpoints"]}
    assert sorted(kept.values()) == [1.0, 2.0]  # top-2; the latest (2.0) is among them
    assert kept[m["best"]] == 1.0
    assert m["latest"] == m["checkpoints"][-1]["name"] and kept[m["latest"]] == 2.0
    on_disk = sorted(n for n in os.listdir(tmp_path) if n not in ("manifest.json", "best.ckpt", "last.ckpt"))
    assert on_disk == sorted(kept)  # the rest were deleted
    assert os.readlink(tmp_path / "best.ckpt") == m["best"] and os.readlink(tmp_path / "last.ckpt") == m["latest"]
    best_weights = read_checkpoint(os.path.join(tmp_path, m["best"]))["model"]["weight"]
    assert not torch.equal(trainer.model.weight, best_weights)
    trainer.apply_weights("best")
    assert torch.equal(trainer.model.weight, best_weights)
    trainer.export_weights(tmp_path / "serve" / "best.safetensors", source="best")
    assert torch.equal(load_file(str(tmp_path / "serve" / "best.safetensors"))["weight"], best_weights)


def test_metric_history_and_best_come_back(tmp_path):
    trainer = make(tmp_path, log_every_n_steps=1)
    trainer.run(2, tiny_loader(), tiny_loader(n=8))
    fresh = make(tmp_path)
    fresh.load_state("latest")
    assert fresh.history == trainer.history and fresh.best == trainer.best
    assert fresh.progress_checker == trainer.progress_checker


def test_per_step_losses_are_stored_only_when_asked(tmp_path):
    plain = make(tmp_path / "plain", log_every_n_steps=1)
    plain.run(1, tiny_loader())
    assert "loss_history" not in read_checkpoint(plain.save_state())
    asked = make(tmp_path / "asked", log_every_n_steps=1, save_loss_history=True)
    asked.run(1, tiny_loader())
    kept = asked.state_dict().get("loss_history")
    stored = read_checkpoint(asked.save_state()).get("loss_history")
    assert stored == kept  # whatever the trainer keeps (None if it keeps no per-step losses)


def test_settings_fail_at_construction(tmp_path):
    with pytest.raises(Exception, match="multiple of log_every_n_steps"):
        make(tmp_path, save_every_n_steps=3, log_every_n_steps=2)
    with pytest.raises(TypeError, match=r"config\['obj'\] is a builtins.object"):
        make(tmp_path, config={"obj": object()})


def test_resume_latest_on_empty_folder_starts_fresh(tmp_path):
    trainer = make(tmp_path, resume="latest")
    trainer.run(1, tiny_loader())
    assert trainer.progress_checker.epoch == 1
    again = make(tmp_path, resume="latest")
    again.run(2, tiny_loader())  # the same 2-epoch run: one epoch was done, one is left
    assert again.progress_checker.epoch == 2 and again.progress_checker.step == 6
    assert again.history[0] == trainer.history[0]  # epoch 1 came from the checkpoint


def test_what_add_ons_put_in_a_checkpoint_is_checked_even_under_a_core_key(tmp_path):
    """The parts the core builds skip the plain-value check; one an add-on replaces does not."""
    from zae_trainer import AddOn

    class Sneaky(AddOn):
        name = "sneaky"

        def __init__(self, *, where: str = "rng") -> None:
            self.where = where

        def on_checkpoint_save(self, trainer, checkpoint):
            checkpoint[self.where] = {"state": object()}

    for where in ("rng", "metrics", "extra"):
        trainer = make(tmp_path / where, cls=TinyTrainer.add_on(Sneaky(where=where)))
        with pytest.raises(TypeError, match=rf"checkpoint\['{where}'\]\['state'\] is a builtins.object"):
            trainer.save_state()
        assert not [n for n in os.listdir(tmp_path / where) if n.endswith(".ckpt")]  # nothing unloadable written
