"""The zae-trainer command line, run as users run it: real processes, real signals, real files."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import zae_trainer
from zae_trainer.cli import main

REPO = Path(__file__).resolve().parents[1]

# Factories a user keeps beside their config. The dataset sleeps per item so that a run
# lasts long enough to be interrupted; SLOW=0 makes it instant.
FACTORIES = '''
import os, time
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class SlowData(Dataset):
    def __init__(self, n, fail_at=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x.sum(1) > 0).long()
        self.fail_at = fail_at

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise IndexError("my dataset has no row " + str(i))
        time.sleep(float(os.environ.get("SLOW", "0")))
        return self.x[i], self.y[i]


def make_model(hidden=8):
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def make_data(n=64, batch_size=8, fail_at=None):
    train = DataLoader(SlowData(n, fail_at), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    return train, DataLoader(SlowData(16), batch_size=16)


def broken_model():
    return make_model(hidden=undefined_name)  # noqa: F821 - the user's own bug
'''

CONFIG = """model: cli_user_factories:make_model
data: {target: cli_user_factories:make_data}
optimizer: {name: SGD, lr: 5e-2}
trainer: {device: cpu, monitor: valid/acc, monitor_mode: max}
run: {n_epoch: 3}
"""


def _command() -> list[str]:
    script = shutil.which("zae-trainer")
    return [script] if script else [sys.executable, "-m", "zae_trainer"]


def _env(slow: float = 0.0) -> dict[str, str]:
    return {**os.environ, "SLOW": str(slow), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A user's project: a config and its factories in a folder of their own."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "cli_user_factories.py").write_text(FACTORIES)
    (folder / "train.yaml").write_text(CONFIG)
    (tmp_path / "work").mkdir()  # where the command runs: not the config's folder
    return folder


@pytest.mark.slow
def test_fit_trains_the_readme_example_and_keeps_a_run_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [*_command(), "fit", str(REPO / "examples" / "digits.yaml"), "--set", "run.n_epoch=2",
         "--set", "trainer.log_bar=false"],
        cwd=tmp_path,  # any folder: the factories resolve beside the config
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "run folder: runs/digits (logs in runs/digits/logs, checkpoints in runs/digits/ckpt)"
    match = re.fullmatch(r"best valid/acc = ([0-9.]+) \(epoch ([12])\)", lines[-3])
    assert match, lines
    assert float(match.group(1)) > 0.5
    assert lines[-2] == f"weights: runs/digits/best.safetensors (epoch {match.group(2)})"
    assert lines[-1] == "weights: runs/digits/final.safetensors"
    run = tmp_path / "runs" / "digits"
    assert (run / "logs" / "metrics.jsonl").stat().st_size > 0
    assert (run / "ckpt" / "manifest.json").exists()
    from safetensors.torch import load_file

    assert {k for k in load_file(run / "best.safetensors")} == {"0.weight", "0.bias", "3.weight", "3.bias"}


@pytest.mark.slow
def test_ctrl_c_leaves_an_emergency_checkpoint_and_the_printed_command_resumes(project: Path) -> None:
    work = project.parent / "work"
    config = str(project / "train.yaml")
    process = subprocess.Popen(
        [*_command(), "fit", config, "--set", "model_args.hidden=6"],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(slow=0.004),
    )
    assert process.stderr is not None
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for the first epoch line, then press Ctrl-C
        line = process.stderr.readline()
        seen.append(line)
        if line.startswith("epoch 1/3") or not line:
            break
    assert seen[-1].startswith("epoch 1/3"), seen
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err, err
    assert len(err.split("zae-trainer: interrupted")[1].strip().splitlines()) == 3, err  # short: 3 lines
    assert re.search(r"zae-trainer: interrupted \(Ctrl-C\) at epoch 2, step \d+\.", err), err
    checkpoint = re.search(r"emergency checkpoint: (\S+)", err)
    command = re.search(r"resume with: (.+)", err)
    assert checkpoint and command, err
    assert checkpoint.group(1).startswith("runs/train/ckpt/") and "interrupt" in checkpoint.group(1)
    assert (work / checkpoint.group(1)).exists()

    words = shlex.split(command.group(1))
    assert words[words.index("fit") :] == [
        "fit", config, "--set", "model_args.hidden=6", "--out", "runs/train", "--resume", "latest"
    ]
    resumed = subprocess.run(
        [*_command(), *words[words.index("fit") :]], cwd=work, capture_output=True, text=True, timeout=180,
        env=_env(),
    )
    assert resumed.returncode == 0, resumed.stderr
    said = re.search(r"resumed from (\S+), epoch 1, step (\d+), batch (\d+) of epoch 2", resumed.stdout)
    assert said, resumed.stdout
    assert said.group(1) == checkpoint.group(1)
    assert int(said.group(2)) == 8 + int(said.group(3))  # 8 batches per epoch
    assert "epoch 3/3" in resumed.stderr and "epoch 1/3" not in resumed.stderr
    assert (work / "runs" / "train" / "final.safetensors").exists()
    assert not (work / "runs" / "train-2").exists()  # resuming reuses the folder


def test_a_second_run_gets_a_numbered_folder_and_an_explicit_taken_folder_is_refused(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(project.parent / "work")
    monkeypatch.setattr("sys.path", list(sys.path))
    config = str(project / "train.yaml")
    for expected in ("runs/train", "runs/train-2"):
        assert main(["fit", config, "--set", "run.n_epoch=1", "--set", "trainer.log_bar=false"]) == 0
        assert capsys.readouterr().out.startswith(f"run folder: {expected} ")
    assert main(["fit", config, "--out", "runs/train"]) == 2
    assert "already holds a run. To continue it, add --resume latest" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", config, "--out", "runs/other", "--no-out"])
    assert exit_info.value.code == 2 and "--out and --no-out exclude each other" in capsys.readouterr().err


def test_errors_in_the_users_own_code_propagate_unchanged(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() re-raises them, so the interpreter prints the user's traceback (exit status 1)."""
    monkeypatch.chdir(project.parent / "work")
    monkeypatch.setattr("sys.path", list(sys.path))
    bad_model = project / "bad_model.yaml"
    bad_model.write_text(CONFIG.replace("cli_user_factories:make_model", "cli_user_factories:broken_model"))
    with pytest.raises(NameError, match="undefined_name") as info:
        main(["fit", str(bad_model), "--no-out"])
    assert info.traceback[-1].name == "broken_model"
    with pytest.raises(IndexError, match="my dataset has no row 5") as index_error:
        main(["fit", str(project / "train.yaml"), "--no-out", "--set", "data.fail_at=5"])
    assert index_error.traceback[-1].name == "__getitem__"
    assert "--no-out: this run saves nothing" in capsys.readouterr().err


def test_version_and_addons_with_their_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"zae-trainer {zae_trainer.__version__} (torch ")
    assert main(["addons"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "StateManagerAddon" in rows["state_manager"]
    assert "save_path (required)" in rows["state_manager"] and "save_format='ckpt'" in rows["state_manager"]
    assert "keep_top_k=3" in rows["state_manager"] and "patience=3" in rows["early_stopping"]
    pytest.importorskip("zae_trainer_ema", reason="the example plugin in addons/ is not installed")
    assert "EMAAddon" in rows["ema"] and "[zae-trainer-ema]" in rows["ema"] and "decay=0.999" in rows["ema"]


def test_a_bad_config_exits_2_naming_the_key_path(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_text("model: examples.digits_factories:make_model\noptimizer: {name: Adamm}\nrun: {n_epoch: 1}\n")
    monkeypatch.syspath_prepend(str(REPO))
    assert main(["fit", str(config)]) == 2
    err = capsys.readouterr().err
    assert "config.optimizer.name" in err and "Did you mean 'Adam'" in err
    assert main(["fit", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["fit", str(config), "--set", "novalue"]) == 2
    assert "key.path=value" in capsys.readouterr().err
    config.write_text(
        "model: examples.digits_factories:make_model\noptimizer: {name: AdamW, lrr: 3e-3}\nrun: {n_epoch: 1}\n"
    )
    assert main(["fit", str(config)]) == 2
    assert "config.optimizer.lrr: AdamW has no setting 'lrr'. Did you mean 'lr'?" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing is created for a config that cannot build


@pytest.mark.slow
def test_sigterm_stops_with_status_143_and_says_how_to_resume(project: Path) -> None:
    work = project.parent / "work"
    process = subprocess.Popen(
        [*_command(), "fit", str(project / "train.yaml"), "--out", "runs/term"],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(slow=0.004),
    )
    assert process.stderr is not None
    line = ""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not line.startswith("epoch 1/3"):
        line = process.stderr.readline()
        if not line:
            break
    assert line.startswith("epoch 1/3"), line
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    assert re.search(r"zae-trainer: terminated \(SIGTERM\) at epoch 2, step \d+\.", err), err
    checkpoint = re.search(r"emergency checkpoint: (\S+)", err)
    assert checkpoint and (work / checkpoint.group(1)).exists(), err
    assert "--out runs/term --resume latest" in err
