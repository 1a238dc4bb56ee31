"""The README's main job trains on real data and meets its accuracy bar."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"


def test_digits_example_reaches_095_held_out_accuracy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy = module.main(["--epochs", "30", "--out", str(tmp_path)])
    assert accuracy >= 0.95
    assert "held-out accuracy" in capsys.readouterr().out
    # the local logger's files: one JSON record per log point and per epoch, and a CSV beside them
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 30
    assert abs(max(r["valid/acc"] for r in epochs) - accuracy) < 1e-6  # the restored best epoch
    assert (tmp_path / "logs" / "metrics.csv").exists()
    assert (tmp_path / "ckpt" / "manifest.json").exists()
