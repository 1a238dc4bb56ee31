"""LocalLoggerAddon: files read back with exact names, values and steps; resume; conformance."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from logging_helpers import MetricTap
from zae_trainer.addons import StateManagerAddon
from zae_trainer.addons import local_logger as local_module
from zae_trainer.addons.local_logger import LocalLoggerAddon, read_jsonl
from zae_trainer.testing import TinyRegressionTrainer, check_addon, tiny_loader, tiny_trainer


def _train(log_dir: Path, epochs: int = 2, **settings: Any) -> tuple[Any, MetricTap]:
    cls = TinyRegressionTrainer.add_on(LocalLoggerAddon(log_dir=log_dir, **settings), MetricTap)
    trainer = tiny_trainer(cls, config={"lr": 0.05, "note": "local"})
    trainer.run(epochs, tiny_loader(), tiny_loader(16, seed=7))
    return trainer, trainer.get_addon(MetricTap)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, MetricTap]:
    log_dir = tmp_path_factory.mktemp("local") / "logs"
    trainer, tap = _train(log_dir, plot=True, tensorboard=True)
    return log_dir, trainer, tap


def test_jsonl_holds_every_log_point_and_epoch_exactly(logged: tuple[Path, Any, MetricTap]) -> None:
    log_dir, trainer, tap = logged
    records = read_jsonl(log_dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    # 48 samples / 8 per batch = 6 steps per epoch, logged every 2 steps
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]
    assert [(r["step"], r["epoch"]) for r in epochs] == [(6, 1), (12, 2)]
    # one convention: epochs are 1-based in both kinds of row (a step row names the epoch it is in)
    assert [(r["step"], r["epoch"]) for r in steps] == [(2, 1), (4, 1), (6, 1), (8, 2), (10, 2), (12, 2)]
    times = [r["time"] for r in records]
    assert times == sorted(times) and times[0] > 0
    assert len(tap.steps) == len(steps) and len(trainer.history) == len(epochs)
    for record, (step, expected) in zip(steps, tap.steps):
        assert record["step"] == step
        assert {k: record[k] for k in expected} == expected  # train/loss, train/mae, lr: same floats
    for record, metrics in zip(epochs, trainer.history):
        assert {k: record[k] for k in metrics} == metrics
    assert set(epochs[0]) == {"kind", "step", "epoch", "time", "train/loss", "train/mae", "valid/loss", "valid/mae"}


def test_csv_is_the_same_table(logged: tuple[Path, Any, MetricTap]) -> None:
    log_dir, _, _ = logged
    records = read_jsonl(log_dir / "metrics.jsonl")
    with open(log_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(records)
    assert list(rows[0])[:4] == ["kind", "step", "epoch", "time"]
    for row, record in zip(rows, records):
        for key, value in record.items():
            assert row[key] == (value if isinstance(value, str) else repr(value) if isinstance(value, float)
                                else str(value))
        assert all(row[k] == "" for k in row if k not in record)


def test_config_and_summary_files(logged: tuple[Path, Any, MetricTap]) -> None:
    log_dir, trainer, _ = logged
    config = json.loads((log_dir / "config.json").read_text())
    assert config["lr"] == 0.05 and config["note"] == "local"
    assert config["zae_trainer"]["optimizer"]["class"] == "SGD"
    assert config["zae_trainer"]["addons"]["local_logger"]["log_dir"] == str(log_dir)
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 2 and summary["steps"] == 12
    assert summary["best/metric"] == "valid/loss"
    assert summary["best/value"] == trainer.best["value"] and summary["best/epoch"] == trainer.best["epoch"]
    assert summary["final_metrics"] == trainer.epoch_metrics


def test_tensorboard_events_read_back(logged: tuple[Path, Any, MetricTap]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir, _, tap = logged
    events = EventAccumulator(str(log_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/mae", "lr", "epoch/train/loss", "epoch/valid/loss", "epoch/valid/mae"} <= tags
    for tag in ("train/loss", "epoch/valid/loss"):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = tap.expected_series(tag)
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32


def test_png_of_the_curves(logged: tuple[Path, Any, MetricTap]) -> None:
    log_dir, _, _ = logged
    assert (log_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_and_tensorboard_can_be_turned_off(tmp_path: Path) -> None:
    _train(tmp_path, epochs=1, plot=False, tensorboard=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "metrics.csv", "metrics.jsonl", "summary.json"]


def test_plots_are_opt_in_even_with_matplotlib_installed(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _train(tmp_path, epochs=1, tensorboard=False)
    assert "metrics.png" not in os.listdir(tmp_path)
    assert LocalLoggerAddon(log_dir=tmp_path).plot is False
    with pytest.raises(TypeError, match="plot must be True or False"):
        LocalLoggerAddon(log_dir=tmp_path, plot="yes")  # type: ignore[arg-type]


def test_asking_for_a_missing_optional_package_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install zae_trainer\\[plot\\]"):
        LocalLoggerAddon(log_dir="unused", plot=True)
    assert LocalLoggerAddon(log_dir="unused").plot is False  # off unless asked for
    with pytest.raises(ImportError, match="pip install zae_trainer\\[tensorboard\\]"):
        LocalLoggerAddon(log_dir="unused", tensorboard=True)
    assert LocalLoggerAddon(log_dir="unused").tensorboard is False  # None: only when installed


def test_a_fresh_run_replaces_files_and_a_resumed_one_drops_records_past_the_checkpoint(tmp_path: Path) -> None:
    log_dir, ckpt = tmp_path / "logs", tmp_path / "ckpt"

    def build(**manager: Any) -> Any:
        cls = TinyRegressionTrainer.add_on(
            LocalLoggerAddon(log_dir=log_dir, plot=False, tensorboard=True),
            StateManagerAddon(save_path=ckpt, **manager),
        )
        return tiny_trainer(cls)

    first = build(keep_last=5)
    first.run(1, tiny_loader())
    checkpoint = first.save_state()  # after epoch 1 (step 6)
    first.run(1, tiny_loader())  # a "crashed" process went on to step 12
    uninterrupted = read_jsonl(log_dir / "metrics.jsonl")
    assert [r["step"] for r in uninterrupted if r["kind"] == "step"] == [2, 4, 6, 8, 10, 12]

    resumed = build(resume=checkpoint)
    resumed.run(2, tiny_loader())  # a fresh process resuming: 2 epochs in all, 1 left
    records = read_jsonl(log_dir / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [(r["kind"], r["step"]) for r in uninterrupted]
    strip = [{k: v for k, v in r.items() if k != "time"} for r in records]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in uninterrupted]  # exact resume, no duplicates
    with open(log_dir / "metrics.csv", newline="") as fh:
        assert [row["step"] for row in csv.DictReader(fh)] == [str(r["step"]) for r in records]

    build().run(1, tiny_loader())  # a new run from step 0 starts the files over
    assert [r["step"] for r in read_jsonl(log_dir / "metrics.jsonl")] == [2, 4, 6, 6]


def test_non_finite_values_round_trip(tmp_path: Path) -> None:
    addon = LocalLoggerAddon(log_dir=tmp_path, plot=False, tensorboard=False)
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(addon), nonfinite_loss="ignore")
    trainer.run(1, [(torch.full((4, 3), math.nan), torch.zeros(4, 1))] * 2)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert math.isnan(records[0]["train/loss"]) and records[0]["step"] == 2


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    class Rank1(TinyRegressionTrainer):
        @property
        def is_main_process(self) -> bool:
            return False

    trainer = tiny_trainer(Rank1.add_on(LocalLoggerAddon(log_dir=tmp_path / "logs")))
    trainer.run(1, tiny_loader())
    assert not (tmp_path / "logs").exists()


def test_local_logger_passes_the_addon_conformance_suite(tmp_path: Path) -> None:
    settings = {"log_dir": str(tmp_path / "logs"), "plot": False}
    report = check_addon(LocalLoggerAddon, settings=settings, workdir=tmp_path)
    assert report["hooks"] == "ok" and report["pickle"] == "ok"
    assert report["sync"] == 0  # not one host read of a tensor between log points
    assert report["state"] == ["ckpt", "safetensors"]


def test_a_jsonl_line_is_what_json_dumps_writes_with_each_float_formatted_once():
    """metrics.jsonl lines are built from floats formatted once for both files; they must
    stay byte-identical to ``json.dumps`` (non-finite values, strings, None, bools, numpy floats)."""
    import json

    import numpy as np

    from zae_trainer.addons.local_logger import _cell, _json_line

    record = {"kind": "step", "step": 3, "time": 0.123456789, "train/loss": 2.3157620541751385, "lr": 1e-4,
              "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "flag": True, "none": None,
              "text": 'a"b\u00e9', "np": np.float64(1.5), 'odd "key"': 1.0}
    texts = {k: float.__repr__(v) for k, v in record.items() if isinstance(v, float)}
    assert _json_line(record, texts) == json.dumps(record)
    assert _cell(np.float64(1.5)) == "1.5" and _cell(float("nan")) == "nan" and _cell(None) == ""
