"""The zae-trainer command line, run as users run it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zae_trainer.cli import main

REPO = Path(__file__).resolve().parents[1]


def _command() -> list[str]:
    script = shutil.which("zae-trainer")
    return [script] if script else [sys.executable, "-m", "zae_trainer.cli"]


def test_fit_trains_the_readme_example_from_its_yaml_with_overrides() -> None:
    result = subprocess.run(
        [*_command(), "fit", "examples/digits.yaml", "--set", "run.n_epoch=2", "--set", "trainer.log_bar=false"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"best valid/acc = ([0-9.]+) \(epoch ([12])\)", line)
    assert match, line
    assert float(match.group(1)) > 0.5


def test_addons_lists_builtins_and_the_installed_example_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["addons"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "StateManagerAddon" in rows["state_manager"] and "save_path" in rows["state_manager"]
    pytest.importorskip("zae_trainer_ema", reason="the example plugin in addons/ is not installed")
    assert "EMAAddon" in rows["ema"] and "[zae-trainer-ema]" in rows["ema"] and "decay" in rows["ema"]


def test_a_bad_config_exits_2_naming_the_key_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model: examples.digits_factories:make_model\noptimizer: {name: Adamm}\nrun: {n_epoch: 1}\n")
    assert main(["fit", str(config)]) == 2
    err = capsys.readouterr().err
    assert "config.optimizer.name" in err and "Did you mean 'Adam'" in err
    assert main(["fit", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["fit", str(config), "--set", "novalue"]) == 2
    assert "key.path=value" in capsys.readouterr().err
