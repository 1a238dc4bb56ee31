"""Batches of every shape users bring reach the device, and ``device=None`` picks the right one."""

from __future__ import annotations

import collections
import dataclasses
import types
from collections import UserDict
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from zae_trainer import Trainer, transfer
from zae_trainer.transfer import auto_device, move_to_device, resolve_devices

META = torch.device("meta")  # a device every build has, so moves are visible without a GPU


class FakeBatchEncoding(UserDict):  # type: ignore[type-arg]
    """Shaped like transformers' BatchEncoding: a UserDict with extra state and its own .to()."""

    def __init__(self, data: dict[str, Any], encodings: list[str]) -> None:
        super().__init__(data)
        self._encodings = encodings
        self.to_calls = 0

    def to(self, device: torch.device) -> "FakeBatchEncoding":  # never used: Mappings are walked
        self.to_calls += 1
        raise AssertionError("a Mapping is moved item by item, keeping its type")


class GraphBatch:
    """A custom batch object (as in PyTorch Geometric) that moves itself."""

    def __init__(self, x: torch.Tensor, name: str) -> None:
        self.x, self.name = x, name

    def to(self, device: torch.device) -> "GraphBatch":
        return GraphBatch(self.x.to(device), self.name)


class InPlaceBatch:
    """A batch whose .to() moves in place and returns nothing."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def to(self, device: torch.device) -> None:
        self.x = self.x.to(device)


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Sample:
    image: torch.Tensor
    meta: dict[str, Any]


def test_any_mapping_moves_and_keeps_its_type_and_attributes() -> None:
    encoding = FakeBatchEncoding({"input_ids": torch.ones(2, 3), "mask": torch.zeros(2, 3)}, ["e1", "e2"])
    moved = move_to_device(encoding, META)
    assert type(moved) is FakeBatchEncoding and moved._encodings == ["e1", "e2"]
    assert moved["input_ids"].device == META and moved["mask"].device == META
    assert encoding["input_ids"].device.type == "cpu" and encoding.to_calls == 0  # input untouched

    user = UserDict(x=torch.ones(1), tag="t")
    moved_user = move_to_device(user, META)
    assert type(moved_user) is UserDict and moved_user["x"].device == META and moved_user["tag"] == "t"

    frozen = types.MappingProxyType({"x": torch.ones(1)})  # read-only, not rebuildable: becomes a dict
    moved_frozen = move_to_device(frozen, META)
    assert moved_frozen == {"x": moved_frozen["x"]} and moved_frozen["x"].device == META

    default = collections.defaultdict(list, x=torch.ones(1))
    moved_default = move_to_device(default, META)
    assert isinstance(moved_default, collections.defaultdict) and moved_default.default_factory is list


def test_objects_with_a_to_method_are_moved_by_it() -> None:
    batch = {"graph": GraphBatch(torch.ones(4), "g"), "inplace": InPlaceBatch(torch.ones(2)), "n": 3, "s": "a"}
    moved = move_to_device(batch, META)
    assert isinstance(moved["graph"], GraphBatch) and moved["graph"].x.device == META
    assert moved["graph"].name == "g" and batch["graph"].x.device.type == "cpu"
    assert moved["inplace"].x.device == META
    assert moved["n"] == 3 and moved["s"] == "a"


def test_a_packed_sequence_moves_by_its_own_to_keeping_batch_sizes_on_the_cpu() -> None:
    packed = nn.utils.rnn.pack_sequence([torch.ones(3, 2), torch.ones(2, 2)])
    moved = move_to_device({"seq": packed}, META)["seq"]
    assert isinstance(moved, nn.utils.rnn.PackedSequence) and moved.data.device == META
    assert moved.batch_sizes.device.type == "cpu"  # what the RNN kernels require


def test_a_to_method_that_fails_is_named_with_a_fix() -> None:
    class Quantity:
        def to(self, unit: str) -> "Quantity":
            raise ValueError(f"cannot convert to {unit}")

    with pytest.raises(TypeError, match=r"Quantity whose \.to\('meta'\) failed.*To fix"):
        move_to_device([Quantity()], META)


def test_namedtuples_and_dataclasses_keep_their_types() -> None:
    batch = (Pair(torch.ones(1), torch.zeros(1)), Sample(torch.ones(2), {"id": torch.ones(1)}))
    moved = move_to_device(batch, META)
    assert type(moved) is tuple and type(moved[0]) is Pair and type(moved[1]) is Sample
    assert moved[0].y.device == META and moved[1].image.device == META and moved[1].meta["id"].device == META


def test_a_trainer_receives_a_user_dict_batch_on_its_device() -> None:
    seen: list[Any] = []

    class DictTrainer(Trainer):
        def train_step(self, batch: Any) -> dict[str, Any]:
            seen.append(batch)
            return {"loss": nn.functional.mse_loss(self.model(batch["x"]), batch["y"])}

        def test_step(self, batch: Any) -> dict[str, Any]:
            return self.train_step(batch)

    model = nn.Linear(2, 1)
    trainer = DictTrainer(model, "cpu", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), log_bar=False)
    loader = [FakeBatchEncoding({"x": torch.ones(4, 2), "y": torch.zeros(4, 1)}, ["e"]) for _ in range(2)]
    trainer.run(1, loader)
    assert len(seen) == 2 and all(type(b) is FakeBatchEncoding for b in seen)
    assert trainer.progress_checker.samples == 8  # batch size found inside the Mapping


# -- the automatic device choice -------------------------------------------------------------------


@pytest.fixture
def availability(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Pretend which accelerators exist, through the same checks transfer.py calls."""
    present = {"cuda": False, "mps": False, "xpu": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: present["cuda"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if present["cuda"] else 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: present["mps"])
    monkeypatch.setattr(torch.xpu, "is_available", lambda: present["xpu"])
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 1 if present["xpu"] else 0)
    return present


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        ({"cuda", "mps", "xpu"}, "cuda"),
        ({"mps", "xpu"}, "mps"),
        ({"cuda", "xpu"}, "cuda"),
        ({"xpu"}, "xpu"),
        (set(), "cpu"),
    ],
)
def test_device_none_prefers_cuda_then_mps_then_xpu_then_cpu(
    availability: dict[str, bool], present: set[str], expected: str
) -> None:
    for kind in availability:
        availability[kind] = kind in present
    assert auto_device() == torch.device(expected)
    assert resolve_devices(None) == [torch.device(expected)]
    assert resolve_devices("auto") == [torch.device(expected)]


def test_an_absent_accelerator_is_refused_naming_what_exists(availability: dict[str, bool]) -> None:
    availability["xpu"] = True
    with pytest.raises(ValueError, match=r"device mps was requested but this machine has 0 MPS.*here: xpu"):
        resolve_devices("mps")
    with pytest.raises(ValueError, match=r"cuda:0 was requested but this machine has 0 CUDA"):
        resolve_devices(0)
    assert resolve_devices("xpu:0") == [torch.device("xpu", 0)]
    availability["cuda"] = True
    assert resolve_devices(["cuda:0", "cuda:1"]) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="has 2 CUDA"):
        resolve_devices("cuda:2")


def test_the_real_machine_gets_its_own_first_accelerator() -> None:
    expected = next((kind for kind, ok in transfer._AUTO_ORDER if ok()), "cpu")
    assert resolve_devices(None) == [torch.device(expected)]
