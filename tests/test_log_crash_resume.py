"""Crash, then resume: a process killed by SIGKILL after it logged past its last checkpoint.

The doomed process (tests/logging_scripts/train_until_killed.py) logs steps 2-10 to W&B,
Neptune, MLflow and the local files, with a checkpoint only at step 6, and is killed. A new
trainer resumes from step 6 and replays steps 8 and 10 (with different values: the doomed
process scaled its loss after the checkpoint). Every backend must keep the replayed rows,
read back from what the real clients wrote.

The test process starts W&B's service before it starts the doomed process, which inherits it
(``WANDB_SERVICE``), as a child of a launcher or notebook that used W&B does. The service still
holds the killed process's run when the resume starts it again ("run ID ... is in use" unless
the add-on frees it), whichever tests ran before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("wandb")
pytest.importorskip("neptune")
pytest.importorskip("mlflow")

from crash_resume_setup import build_trainer, train  # noqa: E402
from logging_helpers import MetricTap  # noqa: E402
from logging_readers import read_wandb_run, wandb_run_files  # noqa: E402
from zae_trainer.addons.local_logger import read_jsonl  # noqa: E402
from zae_trainer.addons.wandb_logger import LoggingBackendWarning, WandBLoggerAddon  # noqa: E402
from zae_trainer.addons.neptune_logger import merge_offline_runs, offline_run_folders, read_offline_run  # noqa: E402
from zae_trainer.testing import TinyRegressionTrainer, tiny_loader, tiny_trainer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]  # generous: a loaded 2-core CI machine

SCRIPT = Path(__file__).parent / "logging_scripts" / "train_until_killed.py"
REPLAYED = [8, 10, 12, 14, 16, 18]


def _wait_for(what: str, ready: Callable[[], bool], child: subprocess.Popen[bytes], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise AssertionError(f"the doomed process exited early ({child.returncode}) waiting for {what}")
        try:
            if ready():
                return
        except (OSError, ValueError, KeyError, IndexError):  # a file still being written
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _wandb_steps(root: Path) -> list[int]:
    files = wandb_run_files(root, "*")
    return read_wandb_run(files[0], wait_for_exit=False).steps() if files else []


def _mlflow_history(root: Path, key: str = "train/loss") -> tuple[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(f"file:{root / 'mlruns'}")
    experiment = client.get_experiment_by_name("zt-crash")
    [run] = client.search_runs([experiment.experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.timestamp, m.step))
    return run.info.run_id, [(m.step, m.value) for m in history]


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading MLflow 3's file store back
        yield _crash_and_resume(tmp_path_factory.mktemp("crash"))


def _crash_and_resume(root: Path) -> dict[str, Any]:
    import wandb

    wandb.setup()  # this process's service, inherited by the doomed process
    assert os.environ.get("WANDB_SERVICE")
    env = {**os.environ, "NEPTUNE_DATA_DIRECTORY": str(root / "neptune"), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(SCRIPT), str(root)], env=env, cwd=root,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for("step 10", lambda: (root / "blocked").exists(), child)
        _wait_for("the W&B row of step 10", lambda: _wandb_steps(root)[-1] == 10, child)
        _wait_for("MLflow's step 10", lambda: _mlflow_history(root)[1][-1][0] == 10, child)
        _wait_for("Neptune's step 10", lambda: read_offline_run(offline_run_folders(root / "neptune")[0])[
            "series"]["train/loss"][-1][0] == 10, child)
        steps = [r["step"] for r in read_jsonl(root / "logs" / "metrics.jsonl") if r["kind"] == "step"]
        assert steps == [2, 4, 6, 8, 10]
        os.kill(child.pid, signal.SIGKILL)  # a real crash: no handler, no RUN_END, no emergency checkpoint
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    [doomed_file] = wandb_run_files(root, "*")
    doomed = {
        "wandb_file": doomed_file,
        "wandb": read_wandb_run(doomed_file, wait_for_exit=False),
        "mlflow": _mlflow_history(root),
        "neptune": read_offline_run(offline_run_folders(root / "neptune")[0]),
        "local": read_jsonl(root / "logs" / "metrics.jsonl"),
    }

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEPTUNE_DATA_DIRECTORY", str(root / "neptune"))
        mp.chdir(root)
        trainer = build_trainer(TinyRegressionTrainer, root, resume=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(trainer)
    return {"root": root, "doomed": doomed, "trainer": trainer, "tap": trainer.get_addon(MetricTap),
            "failures": [str(w.message) for w in caught if issubclass(w.category, LoggingBackendWarning)]}


def test_every_logger_resumed_the_run_of_the_killed_process(crashed_and_resumed: dict[str, Any]) -> None:
    # W&B's service still held the killed process's run: without freeing it, W&B failed to
    # start with "run ID ... is in use" and the resumed process logged nothing to W&B
    assert crashed_and_resumed["failures"] == []


def test_the_doomed_process_logged_past_its_checkpoint(crashed_and_resumed: dict[str, Any]) -> None:
    doomed, tap = crashed_and_resumed["doomed"], crashed_and_resumed["tap"]
    assert doomed["wandb"].steps() == [2, 4, 6, 8, 10] and doomed["wandb"].exit_code is None
    replayed = dict(tap.expected_series("train/loss"))
    for step, value in doomed["wandb"].series("train/loss")[3:]:
        assert value != replayed[step]  # its rows past the checkpoint are not the ones the run keeps


def test_wandb_keeps_every_replayed_row_on_the_declared_step(crashed_and_resumed: dict[str, Any]) -> None:
    root, tap, trainer = crashed_and_resumed["root"], crashed_and_resumed["tap"], crashed_and_resumed["trainer"]
    run_id = trainer.get_addon("wandb_logger").run_id
    assert run_id == crashed_and_resumed["doomed"]["wandb"].run_id  # the same run, continued
    doomed_file = crashed_and_resumed["doomed"]["wandb_file"]
    files = wandb_run_files(root, run_id)
    assert len(files) == 2 and doomed_file in files  # one run folder per process
    [resumed_file] = [f for f in files if f != doomed_file]
    resumed = read_wandb_run(resumed_file)
    assert resumed.steps() == REPLAYED  # 8 and 10 too, below what W&B last saw from the doomed process
    assert resumed.axis("train/loss") == "trainer/step" and resumed.axis("epoch/valid/loss") == "epoch/index"
    assert resumed.series("train/loss") == tap.expected_series("train/loss")
    assert resumed.series("epoch/valid/loss") == tap.expected_epoch_series("epoch/valid/loss")
    assert resumed.exit_code == 0 and resumed.summary["samples"] == 144
    # freeing the killed process's run flushed it, and left it as it was: its rows, no exit
    doomed = read_wandb_run(doomed_file, wait_for_exit=False)
    assert doomed.steps() == [2, 4, 6, 8, 10] and doomed.exit_code is None


#: A process that opens W&B run argv[2] offline under argv[1], logs three rows, says so, and waits to be killed.
_KILLED_RUN = """
import pathlib, sys, time, wandb
root, run_id = pathlib.Path(sys.argv[1]), sys.argv[2]
run = wandb.init(project="zt-crash", mode="offline", dir=str(root), id=run_id, reinit="return_previous")
for x in (1, 2, 3):
    run.log({"x": x})
(root / "ready").write_text(run.dir)
while True:
    time.sleep(0.5)
"""


def test_a_run_held_by_a_killed_process_in_the_shared_wandb_service_is_resumed(tmp_path: Path) -> None:
    """The W&B half of the fixture above in seconds: the killed process shared this process's
    W&B service, which still holds its run; the add-on frees it, flushing its rows, and resumes."""
    import wandb

    wandb.setup()  # the service the killed process inherits (WANDB_SERVICE)
    run_id = f"killed{os.getpid()}x{time.monotonic_ns() % 10**9}"  # unique, in W&B's id alphabet
    child = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(tmp_path), run_id], env=dict(os.environ),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for("its rows", lambda: (tmp_path / "ready").exists(), child, timeout=120)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=60)
    killed_dir = os.path.dirname((tmp_path / "ready").read_text())

    trainer = tiny_trainer(TinyRegressionTrainer.add_on(
        WandBLoggerAddon(project="zt-crash", mode="offline", dir=str(tmp_path), resume_run=True), MetricTap))
    trainer.get_addon("wandb_logger").load_state_dict({"run_id": run_id})  # what a checkpoint restores
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.run(1, tiny_loader())
    assert [str(w.message) for w in caught if issubclass(w.category, LoggingBackendWarning)] == []
    assert trainer.get_addon("wandb_logger").run_id == run_id

    files = wandb_run_files(tmp_path, run_id)
    [killed_file] = [f for f in files if f.startswith(killed_dir + os.sep)]
    [resumed_file] = [f for f in files if f != killed_file]
    resumed = read_wandb_run(resumed_file)
    assert resumed.steps() == [2, 4, 6] and resumed.exit_code == 0
    assert resumed.series("train/loss") == trainer.get_addon(MetricTap).expected_series("train/loss")
    deadline = time.monotonic() + 60  # flushed when its stream was finished (the service closes it in the background)
    while len((killed := read_wandb_run(killed_file, wait_for_exit=False)).rows) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [row["x"] for row in killed.rows] == [1, 2, 3] and killed.exit_code is None


def test_mlflow_keeps_every_replayed_row_in_the_same_run(crashed_and_resumed: dict[str, Any]) -> None:
    root, tap = crashed_and_resumed["root"], crashed_and_resumed["tap"]
    doomed_id, doomed_history = crashed_and_resumed["doomed"]["mlflow"]
    run_id, history = _mlflow_history(root)
    assert run_id == doomed_id and crashed_and_resumed["trainer"].get_addon("mlflow_logger").run_id == run_id
    assert history[: len(doomed_history)] == doomed_history  # what the doomed process wrote stays
    assert history[len(doomed_history):] == tap.expected_series("train/loss")  # and every replayed row is added


def test_local_files_hold_each_step_once_with_the_replayed_values(crashed_and_resumed: dict[str, Any]) -> None:
    root, tap, trainer = crashed_and_resumed["root"], crashed_and_resumed["tap"], crashed_and_resumed["trainer"]
    records = read_jsonl(root / "logs" / "metrics.jsonl")
    steps = [(r["step"], r["epoch"]) for r in records if r["kind"] == "step"]
    assert steps == [(2, 1), (4, 1), (6, 1), (8, 2), (10, 2), (12, 2), (14, 3), (16, 3), (18, 3)]
    assert [(r["step"], r["train/loss"]) for r in records if r["kind"] == "step"][3:] == tap.expected_series(
        "train/loss")
    assert [(r["step"], r["epoch"]) for r in records if r["kind"] == "epoch"] == [(6, 1), (12, 2), (18, 3)]
    # time continues across the resume: since the run's first start, not since this process's
    times = [r["time"] for r in records]
    assert times == sorted(times)
    restored = next(r for r in records if r["kind"] == "epoch")["time"]
    first_replayed = next(r for r in records if r["step"] == 8)["time"]
    assert first_replayed > restored > 0
    summary = json.loads((root / "logs" / "summary.json").read_text())
    assert (summary["epochs"], summary["steps"], summary["samples"]) == (3, 18, 144)
    assert summary["process_seconds"] == trainer.summary.seconds
    assert summary["seconds"] > summary["process_seconds"] and summary["seconds"] >= times[-1] - 1e-6


def test_neptune_series_hold_each_step_once_with_the_replayed_values(crashed_and_resumed: dict[str, Any]) -> None:
    root, tap = crashed_and_resumed["root"], crashed_and_resumed["tap"]
    folders = offline_run_folders(root / "neptune")
    assert len(folders) == 2
    runs = [read_offline_run(f) for f in folders]
    assert [s for s, _ in runs[0]["series"]["train/loss"]] == [2, 4, 6, 8, 10]  # flushed at each log point
    assert "train/loss" in runs[1]["cleared"]  # rewound to the checkpoint's step 6
    merged = merge_offline_runs(runs)  # what a server holds after `neptune sync` of both, in order
    before = runs[0]["series"]["train/loss"][:3]
    assert merged["train/loss"] == before + tap.expected_series("train/loss")
    epoch_index = merged["epoch/index"]
    assert epoch_index == [(6, 1), (12, 2), (18, 3)]
