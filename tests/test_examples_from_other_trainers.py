"""The four "coming from another trainer" workflows (docs/guides/coming-from-other-trainers.md)
run as users run them, on small data, and do what the guide says."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

FOLDER = Path(__file__).resolve().parent.parent / "examples" / "from_other_trainers"


def _script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Load a script as a module named after its file, importable by spawned processes too."""
    monkeypatch.syspath_prepend(str(FOLDER))
    spec = importlib.util.spec_from_file_location(name, FOLDER / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize(("task", "weights"), [("multiclass", "best"), ("binary", "last")])
def test_dltrainer_style(task: str, weights: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    script = _script("dltrainer_style", monkeypatch)
    result = script.main(["--task", task, "--test-weights", weights, "--epochs", "40", "--out", str(tmp_path)])
    trainer, test = result["trainer"], result["test"]
    assert trainer.stop_reason is not None and "early stopping" in trainer.stop_reason  # stopped before 40
    epochs = len(trainer.history)
    assert epochs < 40 and trainer.best["epoch"] == epochs - 3  # patience 3 after the best epoch
    assert all(not key.startswith("test/") for row in trainer.history for key in row)  # testing left no trace
    assert test["test/acc"] > 0.9
    manifest = _manifest(tmp_path / "ckpt")
    chosen = manifest["best"] if weights == "best" else manifest["latest"]
    entry = next(c for c in manifest["checkpoints"] if c["name"] == chosen)
    assert entry["epoch"] == (trainer.best["epoch"] if weights == "best" else epochs)
    final = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.get_addon("state_manager").apply_weights(str(tmp_path / "ckpt" / chosen))
    assert trainer.test(trainer.loaders["test"]) == test  # the weights the script tested
    if weights == "best" and trainer.best["epoch"] != epochs:
        assert any(not torch.equal(final[k], v) for k, v in trainer.model.state_dict().items())
    assert f"test with the {weights} weights" in capsys.readouterr().out


@pytest.mark.slow
def test_minds_style(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    script = _script("minds_style", monkeypatch)
    result = script.main(["--epochs", "8", "--out", str(tmp_path)])
    trainer, manifest = result["trainer"], result["manifest"]
    losses = [row["valid/loss"] for row in trainer.history]
    top3 = sorted(range(1, 9), key=lambda e: losses[e - 1])[:3]
    kept = {c["epoch"] for c in manifest["checkpoints"]}
    assert kept == set(top3) | {8}  # the best three by validation loss, and the last
    best = next(c for c in manifest["checkpoints"] if c["name"] == manifest["best"])
    assert best["epoch"] == top3[0] and math.isclose(best["value"], min(losses), rel_tol=1e-6)
    assert result["wandb"] and list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    for link, name in (("best.ckpt", manifest["best"]), ("last.ckpt", manifest["latest"])):
        assert os.path.basename(os.path.realpath(tmp_path / "ckpt" / link)) == name


def test_lis2_style_in_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = _script("lis2_style", monkeypatch)
    result = script.main(["--world-size", "1", "--epochs", "4", "--out", str(tmp_path)])
    _check_lis2(result, epochs=4)


@pytest.mark.slow
def test_lis2_style_with_ddp_over_two_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = _script("lis2_style", monkeypatch)
    result = script.main(["--world-size", "2", "--epochs", "4", "--out", str(tmp_path)])
    _check_lis2(result, epochs=4)
    assert result["snapshot"]["GLOBAL_CONFIG"]["world_size"] == 2


def _check_lis2(result: dict[str, Any], epochs: int) -> None:
    snapshot = result["snapshot"]
    assert set(snapshot) == {"MODEL", "TRAIN_INFO", "GLOBAL_CONFIG"}
    assert set(snapshot["MODEL"]) == {"config", "state"} and snapshot["MODEL"]["config"] == {"inputs": 5, "hidden": 16}
    info = snapshot["TRAIN_INFO"]
    assert info["epochs_run"] == epochs
    assert info["best_loss"] == pytest.approx(min(r["valid/loss"] for r in result["trainer"].history))
    assert info["optimizer"]["param_groups"][0]["momentum"] == 0.9 and info["scheduler"]["step_size"] == 3
    saved_epochs = {int(re.search(r"epoch(\d{4})", name).group(1)) for name in result["saved"]}  # type: ignore[union-attr]
    assert {2, 4} <= saved_epochs  # every second epoch kept by its own rule, though keep_last=1
    assert all(name.startswith("regressor-epoch") for name in result["saved"])
    trained = result["trainer"].model.state_dict()
    rebuilt = result["rebuilt"].state_dict()
    assert all(torch.equal(trained[k], rebuilt[k]) for k in trained)


def test_lernomatic_style(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    script = _script("lernomatic_style", monkeypatch)
    result = script.main(["--epochs", "8", "--stop-when-acc", "0.93", "--out", str(tmp_path)])
    trainer, fresh = result["trainer"], result["fresh"]
    assert "reached the stopping threshold 0.93" in trainer.stop_reason
    assert trainer.history[-1]["valid/acc"] >= 0.93 and all(r["valid/acc"] < 0.93 for r in trainer.history[:-1])
    assert fresh.history == result["saved_history"] == json.loads((tmp_path / "history.json").read_text())
    steps = trainer.progress_checker.step
    assert fresh.get_addon("momentum_scheduler").steps == steps  # the momentum schedule is in checkpoints
    assert trainer.optimizer.param_groups[0]["momentum"] == pytest.approx(0.5 + 0.4 * steps / (28 * 8))
    assert trainer.current_lr() == pytest.approx(0.2 * 0.995**steps)  # the LR schedule, stepped per iteration
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[epoch")]
    assert printed[0].startswith("[epoch 1 step 14]")  # print_every=14
    manager = trainer.get_addon("state_manager")
    assert (manager.save_every_n_steps, manager.keep_top_k, trainer.log_every_n_steps) == (14, 1, 14)
    best = _manifest(tmp_path / "classifier")["best"]
    assert best is not None and f"step{steps:07d}" in best  # save_best: the stopping epoch is the best
    history = result["autoencoder"].history
    assert history[-1]["valid/loss"] < 0.6 * history[0]["valid/loss"]
    gan = result["gan"]
    assert set(gan.history[0]) == {"train/loss", "train/loss/discriminator", "train/loss/generator", "valid/loss"}
    assert gan.history[-1]["valid/loss"] < gan.history[0]["valid/loss"] / 4  # generated mean moved to the data's
    assert gan.optimizers["discriminator"].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5)  # its own schedule
    assert gan.optimizers["generator"].param_groups[0]["lr"] == pytest.approx(0.01 * 0.9**3)
