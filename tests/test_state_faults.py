"""Crash safety: SIGKILL mid-write, a full disk, truncated files, signals, exceptions, async errors.

Real processes, real signals, a real RLIMIT_FSIZE: nothing here is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch import nn

from core_helpers import TinyTrainer, tiny_loader
from state_scripts.resumable_run import EPOCHS, make_loader, make_trainer, make_valid_loader, outcome
from zae_trainer import AddOn
from zae_trainer.addons import StateManagerAddon
from zae_trainer.addons.checkpoint import CheckpointCorruptError, CheckpointWriteError, read_checkpoint
from zae_trainer.addons.checkpoint.atomic import TEMP_MARK

SCRIPTS = os.path.join(os.path.dirname(__file__), "state_scripts")


def manifest(folder) -> dict:
    with open(os.path.join(folder, "manifest.json")) as fh:
        return json.load(fh)


def temp_files(folder) -> list[str]:
    return [n for n in os.listdir(folder) if TEMP_MARK in n]


def make(save_path, **settings):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    settings.setdefault("log_bar", False)
    settings.setdefault("handle_signals", False)
    return TinyTrainer.add_on(StateManagerAddon)(
        model, "cpu", "train", torch.optim.SGD(model.parameters(), lr=0.1), None, save_path=str(save_path), **settings
    )


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_sigkill_mid_write_leaves_previous_checkpoint_loadable(tmp_path, fmt):
    folder = tmp_path / "ckpts"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "write_loop.py"), "--save-path", str(folder), "--format", fmt],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    saved: list[str] = []
    caught_mid_write = False
    try:
        for line in proc.stdout:
            if line.startswith("saved "):
                saved.append(line.split(" ", 1)[1].strip())
            elif line.startswith("writing") and saved:
                deadline = time.monotonic() + 5
                while not temp_files(folder) and time.monotonic() < deadline:
                    time.sleep(0.0005)
                caught_mid_write = bool(temp_files(folder))
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert caught_mid_write, "the kill did not land during a write"
    latest = manifest(folder)["latest"]
    assert os.path.join(folder, latest) == saved[-1]  # the interrupted write was never published
    ckpt = read_checkpoint(saved[-1])
    assert ckpt["model"]["0.weight"].shape == (2048, 2048)
    assert temp_files(folder)  # the dead writer's leftovers ...
    make(folder)  # ... are removed by the next trainer that uses the folder
    assert not temp_files(folder)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_disk_full_raises_clear_error_and_removes_temp_files(tmp_path, fmt):
    folder = tmp_path / "ckpts"
    out = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "write_loop.py"), "--save-path", str(folder), "--format", fmt,
         "--width", "512", "--fsize-limit", str(1 << 20)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert result["type"] == "CheckpointWriteError"
    assert "file-size limit" in result["error"] and "temporary file was removed" in result["error"]
    assert str(folder) in result["error"]
    assert not [n for n in result["listing"] if TEMP_MARK in n]
    first = [line.split(" ", 1)[1] for line in out.stdout.splitlines() if line.startswith("saved ")][0]
    assert manifest(folder)["latest"] == os.path.basename(first)  # the failed save never became "latest"
    read_checkpoint(first)  # and the previous one is intact


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_truncated_newest_falls_back_with_warning_but_explicit_path_raises(tmp_path, fmt):
    make(tmp_path, save_format=fmt).run(2, tiny_loader())
    entries = manifest(tmp_path)["checkpoints"]
    newest, previous = entries[-1]["name"], entries[-2]["name"]
    victim = os.path.join(tmp_path, newest) if fmt == "ckpt" else os.path.join(tmp_path, newest, "model.safetensors")
    with open(victim, "r+b") as fh:
        fh.truncate(os.path.getsize(victim) // 2)
    resumed = make(tmp_path, save_format=fmt)
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint") as caught:
        assert resumed.load_state("latest") == os.path.join(tmp_path, previous)
    assert newest in str(caught[0].message)
    assert resumed.progress_checker.epoch == 1
    with pytest.raises(CheckpointCorruptError) as info:
        resumed.load_state(os.path.join(tmp_path, newest))
    assert newest in str(info.value)


@pytest.mark.slow
def test_sigterm_writes_emergency_checkpoint_at_step_boundary_then_exits_143(tmp_path):
    reference = make_trainer(str(tmp_path / "ref"))
    reference.run(EPOCHS, make_loader(), make_valid_loader())
    folder = tmp_path / "run"
    cmd = [sys.executable, os.path.join(SCRIPTS, "resumable_run.py"), "--save-path", str(folder),
           "--out", str(tmp_path / "out.pt"), "--step-sleep", "0.05", "--handle-signals"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = []
    for line in proc.stdout:
        if line.startswith("step "):
            steps.append(int(line.split()[1]))
            if steps[-1] == 5:
                proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.stderr.read()
    latest = manifest(folder)["checkpoints"][-1]
    assert latest["reasons"] == ["interrupt"] and latest["step"] == steps[-1]
    subprocess.run(cmd[:-3], check=True, capture_output=True, timeout=120)  # resume to the end
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    expected = outcome(reference)
    assert torch.equal(resumed["losses"], expected["losses"])
    for name, value in expected["params"].items():
        assert torch.equal(resumed["params"][name], value)


class FailingTrainer(TinyTrainer):
    fail_at_step = 4
    error: type = RuntimeError

    def train_step(self, batch):
        if self.progress_checker.step == self.fail_at_step:
            raise self.error("boom")
        return super().train_step(batch)


def test_exception_writes_emergency_checkpoint_when_state_is_consistent(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    trainer = FailingTrainer.add_on(StateManagerAddon)(
        model, "cpu", "train", torch.optim.SGD(model.parameters(), lr=0.1), None,
        save_path=str(tmp_path), log_bar=False, handle_signals=False,
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run(3, tiny_loader(n=40))  # 5 batches per epoch: step 4 is mid-epoch
    latest = manifest(tmp_path)["checkpoints"][-1]
    assert latest["reasons"] == ["exception"] and latest["step"] == 4 and latest["batch_in_epoch"] == 4
    saved = read_checkpoint(os.path.join(tmp_path, latest["name"]))
    assert torch.equal(saved["model"]["weight"], model.weight.detach())


class _FailingUpdate(TinyTrainer):
    """Raises inside the optimizer phase at step 4: in the step itself, or in an AFTER_OPTIMIZER_STEP hook."""

    where = "step"

    def optimizer_step(self):
        if self.progress_checker.step == 4 and self.where == "step":
            raise RuntimeError("boom in the update")
        super().optimizer_step()


class _RaisesAfterStep(AddOn):
    name = "raises_after_step"

    def on_after_optimizer_step(self, trainer):
        if trainer.progress_checker.step == 5:  # step 4's update is applied and counted, its hooks run
            raise RuntimeError("boom after the update")


@pytest.mark.parametrize("where", ["step", "after_step_hook"])
def test_no_emergency_checkpoint_from_inside_an_optimizer_update(tmp_path, where):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    trainer_cls = type("Failing", (_FailingUpdate,), {"where": where}).add_on(StateManagerAddon, _RaisesAfterStep)
    trainer = trainer_cls(
        model, "cpu", "train", torch.optim.SGD(model.parameters(), lr=0.1), None,
        save_path=str(tmp_path), log_bar=False, handle_signals=False,
    )
    with pytest.warns(RuntimeWarning, match="no emergency checkpoint: the error came during an optimizer update"):
        with pytest.raises(RuntimeError, match="boom"):
            trainer.run(3, tiny_loader(n=40))  # 5 batches per epoch: step 4 is mid-epoch, nothing saved yet
    assert not os.path.exists(os.path.join(tmp_path, "manifest.json"))


def test_emergency_checkpoint_after_the_update_when_a_batch_end_hook_raises(tmp_path):
    class RaisesAtBatchEnd(AddOn):
        name = "raises_at_batch_end"

        def on_train_batch_end(self, trainer):
            if trainer.progress_checker.step == 4:
                raise RuntimeError("boom at batch end")

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    trainer = TinyTrainer.add_on(StateManagerAddon, RaisesAtBatchEnd)(
        model, "cpu", "train", torch.optim.SGD(model.parameters(), lr=0.1), None,
        save_path=str(tmp_path), log_bar=False, handle_signals=False,
    )
    with pytest.raises(RuntimeError, match="boom at batch end"):
        trainer.run(3, tiny_loader(n=40))
    latest = manifest(tmp_path)["checkpoints"][-1]  # the update was complete: the state is consistent
    assert latest["reasons"] == ["exception"] and latest["step"] == 4 and latest["batch_in_epoch"] == 4
    saved = read_checkpoint(os.path.join(tmp_path, latest["name"]))
    assert torch.equal(saved["model"]["weight"], model.weight.detach())


def test_no_emergency_checkpoint_after_a_non_finite_loss(tmp_path):
    class NaNTrainer(TinyTrainer):
        def train_step(self, batch):
            out = super().train_step(batch)
            return {"loss": out["loss"] * float("nan")}

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    trainer = NaNTrainer.add_on(StateManagerAddon)(
        model, "cpu", "train", torch.optim.SGD(model.parameters(), lr=0.1), None,
        save_path=str(tmp_path), log_bar=False, handle_signals=False, log_every_n_steps=1,
    )
    with pytest.warns(RuntimeWarning, match="no emergency checkpoint: the loss was not finite"):
        with pytest.raises(FloatingPointError):
            trainer.run(1, tiny_loader())
    assert not os.path.exists(os.path.join(tmp_path, "manifest.json"))


def test_async_save_writes_the_same_checkpoints(tmp_path):
    sync = make(tmp_path / "sync")
    sync.run(2, tiny_loader(), tiny_loader(n=8))
    asyn = make(tmp_path / "async", async_save=True)
    asyn.run(2, tiny_loader(), tiny_loader(n=8))
    a, b = manifest(tmp_path / "sync"), manifest(tmp_path / "async")
    assert [e["name"] for e in a["checkpoints"]] == [e["name"] for e in b["checkpoints"]]
    for e in a["checkpoints"]:
        one = read_checkpoint(os.path.join(tmp_path / "sync", e["name"]))
        two = read_checkpoint(os.path.join(tmp_path / "async", e["name"]))
        assert torch.equal(one["model"]["weight"], two["model"]["weight"])
        assert one["progress"] == two["progress"] and one["history"] == two["history"]


def test_async_writer_error_surfaces_on_the_training_thread(tmp_path):
    folder = tmp_path / "ckpts"
    trainer = make(folder, async_save=True)
    os.rmdir(folder)
    folder.write_text("a file where the folder was")  # every write now fails, in the writer thread
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:
            trainer.run(2, tiny_loader())
    chain = [info.value, info.value.__cause__, getattr(info.value.__cause__, "__cause__", None)]
    assert any(isinstance(e, CheckpointWriteError) for e in chain), chain
