"""examples/torchmetrics_f1.py: F1 and AUROC over the whole validation set, as scikit-learn scores them."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("sklearn")
pytest.importorskip("torchmetrics")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "torchmetrics_f1.py"


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("torchmetrics_f1", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_epoch_metrics_equal_scikit_learn_scores_of_the_final_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sklearn.metrics import f1_score, roc_auc_score

    import zae_trainer.seed

    monkeypatch.setattr(zae_trainer.seed, "_current", None)  # leave no recorded seed to later tests
    example = _load_example()
    trainer = example.main(["--epochs", "6"])
    assert "valid AUROC" in capsys.readouterr().out
    assert trainer.config["seed"] == 0

    _, valid_set = example.load_split(seed=0)
    loader = DataLoader(valid_set, batch_size=16)
    probabilities = torch.cat(trainer.inference(loader))
    targets = torch.cat([y for _, y in loader])
    metrics = trainer.epoch_metrics
    assert metrics["valid/f1"] == pytest.approx(f1_score(targets, probabilities > 0.5), abs=1e-6)
    assert metrics["valid/auroc"] == pytest.approx(roc_auc_score(targets, probabilities), abs=1e-6)
    assert metrics["valid/auroc"] > 0.95 and metrics["valid/f1"] > 0.9
    assert trainer.best["metric"] == "valid/auroc"
    assert trainer.best["value"] == max(h["valid/auroc"] for h in trainer.history)
