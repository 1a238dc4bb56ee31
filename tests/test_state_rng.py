"""Random generator states in checkpoints: exact round trips, and unchanged generators not re-read."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from zae_trainer.addons.checkpoint import rng
from zae_trainer.addons.checkpoint.rng import capture_rng, restore_rng


def draws() -> tuple[float, float, float, float]:
    """One value from each generator (numpy's normal may come from its cached Gaussian)."""
    return random.random(), float(np.random.rand()), float(np.random.randn()), float(torch.rand(()))


class CountingGetState:
    """``np.random.get_state`` that counts its calls (and, like the real one, has ``__self__``)."""

    def __init__(self, real, calls: list[int]) -> None:
        self.real, self.calls, self.__self__ = real, calls, real.__self__

    def __call__(self, *args, **kwargs):
        self.calls.append(1)
        return self.real(*args, **kwargs)


def test_every_generator_continues_exactly_after_restore() -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws()
    saved = capture_rng()
    expected = [draws() for _ in range(3)]
    restore_rng(saved)
    assert [draws() for _ in range(3)] == expected


@pytest.mark.parametrize("normals", [0, 1, 2, 3])
def test_numpy_cached_gaussian_is_kept(normals: int) -> None:
    """An odd number of normals leaves one cached: the restored run must return it next."""
    np.random.seed(5)
    np.random.randn(normals)
    saved = capture_rng()
    assert saved["numpy"]["has_gauss"] == normals % 2
    expected = np.random.randn(4).tolist()
    restore_rng(saved)
    assert np.random.randn(4).tolist() == expected


def test_unchanged_generators_are_not_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    np.random.seed(7)
    np.random.rand()  # past the seeding's key generation, so a draw moves the position by 2
    first = capture_rng()
    calls: list[int] = []
    monkeypatch.setattr(np.random, "get_state", CountingGetState(np.random.get_state, calls))
    again = capture_rng()
    assert again == first and calls == []  # nothing drew since: numpy's state is not copied again
    np.random.rand()  # a draw moves the position: read in full
    moved = capture_rng()
    assert calls == [1] and moved["numpy"]["pos"] == first["numpy"]["pos"] + 2
    restore_rng(first)
    assert capture_rng() == first and calls == [1, 1]


def test_consuming_a_cached_gaussian_is_seen() -> None:
    """With a cached normal the state is always read in full: consuming it moves nothing else."""
    np.random.seed(8)
    np.random.randn()  # one normal drawn, its pair cached
    with_cache = capture_rng()
    assert with_cache["numpy"]["has_gauss"] == 1
    np.random.randn()  # consumes the cached value only: key and position stay
    without = capture_rng()
    assert without["numpy"]["has_gauss"] == 0
    assert (without["numpy"]["keys"], without["numpy"]["pos"]) == (with_cache["numpy"]["keys"], with_cache["numpy"]["pos"])


def test_python_and_torch_keys_follow_their_generators() -> None:
    random.seed(11), torch.manual_seed(12)
    before = capture_rng()
    assert capture_rng()["python"] == before["python"]
    random.random(), torch.rand(3)
    after = capture_rng()
    assert after["python"]["state"] != before["python"]["state"]
    assert after["torch"] != before["torch"]
    restore_rng(before)
    assert capture_rng()["python"] == before["python"] and capture_rng()["torch"] == before["torch"]


def test_a_numpy_whose_raw_state_reads_otherwise_is_read_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """The raw read is trusted only after it matched a full read: a wrong layout caches nothing."""
    np.random.seed(13)
    monkeypatch.setattr(rng, "_numpy_raw", lambda np: b"\0" * 2500)  # never what get_state reports
    capture_rng()
    assert rng._last_numpy is None
    expected = capture_rng()["numpy"]
    np.random.rand()
    assert capture_rng()["numpy"] != expected  # the draw is seen: nothing stale was reused
