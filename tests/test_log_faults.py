"""Logging never kills a run: unreachable servers, backends raising mid-run, full disks, other ranks."""

from __future__ import annotations

import base64
import json
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from conftest import closed_local_port
from logging_helpers import QUIET
from zae_trainer import AddOn
from zae_trainer.addons._logging_common import LoggerAddOn, LoggingBackendWarning
from zae_trainer.addons.local_logger import LocalLoggerAddon, read_jsonl
from zae_trainer.testing import TinyRegressionTrainer, tiny_loader, tiny_trainer

pytestmark = pytest.mark.timeout(120)


def _run_recording_warnings(trainer: Any, epochs: int = 1) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.run(epochs, tiny_loader())
    assert trainer.summary.status == "finished"
    return [w for w in caught if issubclass(w.category, LoggingBackendWarning)]


class Saboteur(AddOn):
    """Runs `patch(trainer)` at RUN_BEGIN, after the loggers started (order 150 > their 100)."""

    order = 150

    def __init__(self, *, patch: Any = None) -> None:
        self.patch = patch

    def on_run_begin(self, trainer: Any) -> None:
        self.patch(trainer)


def failing_from_second_call(original: Any, error: Exception) -> Any:
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] >= 2:
            raise error
        return original(*args, **kwargs)

    return wrapper


# ======================================================================================
# The shared base: every backend error is contained, one warning per run
# ======================================================================================
class Flaky(LoggerAddOn):
    name = "flaky"
    backend = "Flaky"

    def __init__(self, *, fail_in: str = "step") -> None:
        super().__init__()
        self.fail_in = fail_in
        self.calls: list[str] = []

    def _do(self, what: str) -> None:
        self.calls.append(what)
        if what == self.fail_in:
            raise ConnectionError(f"{what} went wrong")

    def _open(self, trainer: Any) -> bool:
        self._do("open")
        return True

    def _write_step(self, step: int, record: dict[str, float]) -> None:
        self._do("step")

    def _write_epoch(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self._do("epoch")

    def _write_summary(self, trainer: Any, summary: dict[str, Any]) -> None:
        self._do("summary")

    def _close(self, failed: bool) -> None:
        self._do("close")


@pytest.mark.parametrize("fail_in", ["open", "step", "epoch", "summary", "close"])
def test_a_backend_failing_anywhere_warns_once_and_training_finishes(fail_in: str) -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(Flaky(fail_in=fail_in)))
    caught = _run_recording_warnings(trainer)
    assert len(caught) == 1
    assert "Flaky logging failed to" in str(caught[0].message) and "training continues" in str(caught[0].message)
    calls = trainer.get_addon("flaky").calls
    assert calls.count(fail_in) == 1  # disabled after the first failure
    assert calls[-1] == "close" or fail_in == "open"  # what was logged is closed properly
    if fail_in != "open":
        assert calls.count("close") == 1
    caught = _run_recording_warnings(trainer)  # the next run() tries again, and warns again once
    assert len(caught) == 1


# ======================================================================================
# Real clients
# ======================================================================================
def test_wandb_with_an_unreachable_server_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    from logging_readers import read_wandb_run, wandb_run_file
    from zae_trainer.addons.wandb_logger import WandBLoggerAddon

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_local_port()}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    addon = WandBLoggerAddon(project="zt-unreachable", mode="online", init_timeout=2, dir=str(tmp_path))
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(addon))
    started = time.perf_counter()
    caught = _run_recording_warnings(trainer)
    elapsed = time.perf_counter() - started
    assert len(caught) == 1 and "logging offline" in str(caught[0].message)
    assert elapsed < 30, f"the unreachable server held training for {elapsed:.1f} s"
    run_id = trainer.get_addon("wandb").run_id
    assert "offline-run" in trainer.get_addon("wandb").run_dir
    log = read_wandb_run(wandb_run_file(tmp_path, run_id))
    assert [s for s, _ in log.series("train/loss")] == [2, 4, 6]


def test_wandb_that_cannot_start_at_all_is_skipped_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from zae_trainer.addons.wandb_logger import WandBLoggerAddon

    def refuse(**kwargs: Any) -> Any:
        raise wandb.errors.CommError("no network")

    monkeypatch.setattr(wandb, "init", refuse)
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(WandBLoggerAddon(mode="online")))
    caught = _run_recording_warnings(trainer)
    assert len(caught) == 1 and "failed to start" in str(caught[0].message)
    assert trainer.get_addon("wandb").run_id is None


def test_wandb_raising_mid_run_is_disabled_and_its_run_finished(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    from logging_readers import read_wandb_run, wandb_run_file
    from zae_trainer.addons.wandb_logger import WandBLoggerAddon

    def patch(trainer: Any) -> None:
        run = trainer.get_addon("wandb")._run
        run.log = failing_from_second_call(run.log, ValueError("wandb broke"))

    cls = TinyRegressionTrainer.add_on(WandBLoggerAddon(mode="offline", dir=str(tmp_path)), Saboteur(patch=patch))
    trainer = tiny_trainer(cls)
    caught = _run_recording_warnings(trainer, epochs=2)
    assert len(caught) == 1 and "wandb broke" in str(caught[0].message)
    assert trainer.progress_checker.step == 12  # training went on to the end
    log = read_wandb_run(wandb_run_file(tmp_path, trainer.get_addon("wandb").run_id))
    assert log.steps() == [2] and log.exit_code == 0  # what it had is kept, the run closed


def test_neptune_with_an_unreachable_server_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("neptune")
    from zae_trainer.addons.neptune_logger import NeptuneLoggerAddon, offline_run_folders, read_offline_run

    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(tmp_path / "neptune"))
    address = f"http://127.0.0.1:{closed_local_port()}"
    token = base64.b64encode(json.dumps({"api_address": address, "api_url": address, "api_key": "x"}).encode()).decode()
    addon = NeptuneLoggerAddon(project="ws/zt", api_token=token, mode="async", init_timeout=1, **QUIET)
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(addon))
    started = time.perf_counter()
    caught = _run_recording_warnings(trainer)
    elapsed = time.perf_counter() - started
    assert len(caught) == 1 and "logging offline" in str(caught[0].message)
    assert elapsed < 20, f"the unreachable server held training for {elapsed:.1f} s"  # neptune alone retries ~60 s
    [folder] = offline_run_folders(tmp_path / "neptune")
    assert [s for s, _ in read_offline_run(folder)["series"]["train/loss"]] == [2, 4, 6]


def test_neptune_raising_mid_run_is_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("neptune")
    from neptune.handler import Handler

    from zae_trainer.addons.neptune_logger import NeptuneLoggerAddon, offline_run_folders, read_offline_run

    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(tmp_path / "neptune"))

    def patch(trainer: Any) -> None:
        monkeypatch.setattr(Handler, "append", failing_from_second_call(Handler.append, OSError("queue broke")))

    cls = TinyRegressionTrainer.add_on(NeptuneLoggerAddon(mode="offline", **QUIET), Saboteur(patch=patch))
    trainer = tiny_trainer(cls)
    caught = _run_recording_warnings(trainer)
    assert len(caught) == 1 and "queue broke" in str(caught[0].message)
    [folder] = offline_run_folders(tmp_path / "neptune")
    data = read_offline_run(folder)
    assert data["series"]["train/loss"] == [(2, data["series"]["train/loss"][0][1])]
    assert "summary/status" not in data["fields"]  # disabled: nothing after the failure


def test_a_full_disk_does_not_stop_training(tmp_path: Path) -> None:
    class FullDisk:
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    def patch(trainer: Any) -> None:
        addon = trainer.get_addon("local_logger")
        addon._jsonl.close()
        addon._jsonl = FullDisk()

    cls = TinyRegressionTrainer.add_on(LocalLoggerAddon(log_dir=tmp_path, plot=False, tensorboard=False),
                                       Saboteur(patch=patch))
    trainer = tiny_trainer(cls)
    caught = _run_recording_warnings(trainer)
    assert len(caught) == 1 and "No space left" in str(caught[0].message)
    assert trainer.progress_checker.step == 6 and read_jsonl(tmp_path / "metrics.jsonl") == []


def test_only_the_main_process_starts_web_loggers(monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    neptune = pytest.importorskip("neptune")
    from zae_trainer.addons.neptune_logger import NeptuneLoggerAddon
    from zae_trainer.addons.wandb_logger import WandBLoggerAddon

    def forbidden(**kwargs: Any) -> Any:
        raise AssertionError("a non-main rank started a logger")

    monkeypatch.setattr(wandb, "init", forbidden)
    monkeypatch.setattr(neptune, "init_run", forbidden)

    class Rank1(TinyRegressionTrainer):
        @property
        def is_main_process(self) -> bool:
            return False

    trainer = tiny_trainer(Rank1.add_on(WandBLoggerAddon(mode="offline"), NeptuneLoggerAddon(mode="offline")))
    assert _run_recording_warnings(trainer) == []
