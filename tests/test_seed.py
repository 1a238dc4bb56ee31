"""seed_everything: every generator a run draws from, loader workers included, and the record of it."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import zae_trainer.seed as seed_module
from zae_trainer import Trainer, seed_everything
from zae_trainer.addons import LocalLoggerAddon
from zae_trainer.seed import loader_seeding, seed_worker


@pytest.fixture(autouse=True)
def restore_global_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test leaves determinism flags, the environment and the recorded seed as it found them."""
    monkeypatch.setattr(seed_module, "_current", None)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2], flags[3]


class Draws(Dataset[tuple[float, float, float]]):
    """Each item is drawn from Python's, NumPy's and torch's global generators (in the worker)."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))


def _draws() -> tuple[float, float, float, list[float]]:
    weights = nn.Linear(3, 2).weight.detach().flatten().tolist()
    return random.random(), float(np.random.rand()), float(torch.rand(())), weights


def _worker_draws(**loader_kwargs: Any) -> list[list[float]]:
    loader = DataLoader(Draws(), batch_size=2, num_workers=2, **loader_kwargs)
    return [torch.stack(list(batch)).flatten().tolist() for batch in loader]


def test_same_seed_same_draws_everywhere_and_another_seed_differs() -> None:
    seed_everything(11)
    first = _draws()
    seed_everything(11)
    assert _draws() == first  # Python, NumPy, torch and model initialisation
    seed_everything(12)
    other = _draws()
    assert all(a != b for a, b in zip(first, other))


def test_loader_workers_draw_alike_after_the_same_seed() -> None:
    seed_everything(5)
    first = _worker_draws()
    seed_everything(5)
    assert _worker_draws() == first
    values = [v for batch in first for v in batch]
    assert len(set(values)) == len(values)  # two workers, three libraries: no repeated stream
    seed_everything(6)
    assert _worker_draws() != first


def test_loader_seeding_makes_a_loader_independent_of_other_draws() -> None:
    def order(seed: int, draws_before: int) -> list[list[int]]:
        seed_everything(0)
        torch.rand(draws_before)  # the model drew more or fewer numbers before the loader started
        loader = DataLoader(list(range(10)), batch_size=5, shuffle=True, num_workers=2, **loader_seeding(seed))
        return [b.tolist() for b in loader]

    assert order(3, 1) == order(3, 100)
    assert order(3, 1) != order(4, 1)
    worker_values = _worker_draws(**loader_seeding(9))
    assert worker_values == _worker_draws(**loader_seeding(9))


def test_seed_worker_reseeds_python_and_numpy_from_the_worker_torch_seed() -> None:
    torch.manual_seed(1234)
    seed_worker(0)
    expected = (random.random(), float(np.random.rand()))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(1234)
    seed_worker(0)
    assert (random.random(), float(np.random.rand())) == expected


@pytest.mark.parametrize("mode", [True, "warn"])
def test_deterministic_turns_on_deterministic_kernels_and_the_cublas_workspace(mode: bool | str) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    info = seed_everything(3, deterministic=mode)  # type: ignore[arg-type]
    assert info.deterministic == mode
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled() == (mode == "warn")
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_deterministic_false_leaves_determinism_settings_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    torch.use_deterministic_algorithms(True)
    seed_everything(3)
    assert torch.are_deterministic_algorithms_enabled()
    seed_everything(3, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's own setting wins


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "7", True, None])
def test_bad_seeds_are_refused_with_a_fix(seed: Any) -> None:
    with pytest.raises(ValueError, match=r"seed must be an integer from 0 to 4294967295.*To fix"):
        seed_everything(seed)


def test_bad_deterministic_value_is_refused() -> None:
    with pytest.raises(ValueError, match="deterministic must be True, False or 'warn'"):
        seed_everything(1, deterministic="yes")  # type: ignore[arg-type]


class _Tiny(Trainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model(x), y)}

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self.train_step(batch)


def test_the_seed_is_recorded_in_the_run_config_and_written_by_the_logger(tmp_path: Any) -> None:
    model = nn.Linear(2, 1)
    unseeded = _Tiny(model, "cpu", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), log_bar=False)
    assert "seed" not in unseeded.config

    seed_everything(21, deterministic="warn")
    model = nn.Linear(2, 1)
    trainer = _Tiny.add_on(LocalLoggerAddon)(
        model, "cpu", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), log_bar=False,
        log_dir=tmp_path, config={"lr": 0.1},
    )
    assert trainer.config == {"lr": 0.1, "seed": 21, "deterministic": "warn"}
    trainer.run(1, [(torch.ones(4, 2), torch.zeros(4, 1))])
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["seed"] == 21 and written["deterministic"] == "warn" and written["lr"] == 0.1

    explicit = _Tiny(model, "cpu", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config={"seed": 99})
    assert explicit.config == {"seed": 99}  # the user's own record is not overwritten
