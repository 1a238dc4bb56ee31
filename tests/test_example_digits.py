"""The README's main job trains on real data and meets its accuracy bar on a test split that
played no part in choosing the best epoch."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_three_splits_are_disjoint_stratified_and_cover_the_data() -> None:
    train, valid, test = _example().load_digits_split(seed=0)
    assert (len(train), len(valid), len(test)) == (1149, 288, 360)
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    everything = sorted((tuple(x.tolist()), int(y)) for x, y in zip(pixels, digits.target))
    split_rows = sorted((tuple(x.tolist()), int(y)) for split in (train, valid, test) for x, y in split)
    assert split_rows == everything  # a partition: every image in exactly one split
    counts = torch.bincount(torch.stack([y for _, y in test]), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: about 36 of each digit


def test_digits_example_reaches_095_test_accuracy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    accuracy = _example().main(["--epochs", "30", "--out", str(tmp_path)])
    assert accuracy >= 0.95
    out = capsys.readouterr().out
    line = re.search(
        r"test accuracy: ([0-9.]+) on 360 held-out digits \(best epoch (\d+), chosen on 288 validation digits: "
        r"([0-9.]+)\)",
        out,
    )
    assert line, out
    assert float(line.group(1)) == pytest.approx(accuracy, abs=1e-4)
    # the local logger's files: one JSON record per log point and per epoch, and a CSV beside them
    records = [json.loads(row) for row in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 30
    best_valid = max(r["valid/acc"] for r in epochs)
    assert float(line.group(3)) == pytest.approx(best_valid, abs=1e-4)  # selection used the validation split
    first_best = next(i + 1 for i, r in enumerate(epochs) if r["valid/acc"] == best_valid)
    assert int(line.group(2)) == first_best  # ties keep the earliest epoch, as the checkpoint manifest does
    assert (tmp_path / "logs" / "metrics.csv").exists()
    assert (tmp_path / "ckpt" / "manifest.json").exists()
