"""PrecisionMixerAddon: resolution of the setting, autocast dtypes, loss scaling, state, convergence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from zae_trainer import TrainerConfigError
from zae_trainer.addons.precision import PrecisionMixerAddon, resolve_precision
from zae_trainer.testing import TinyRegressionTrainer, check_addon, tiny_loader, tiny_trainer

CPU = torch.device("cpu")


class DtypeProbe(TinyRegressionTrainer):
    """Remembers the dtype of the model output in each phase."""

    seen: dict[str, torch.dtype]

    def train_step(self, batch: Any) -> dict[str, Any]:
        self.seen = getattr(self, "seen", {})
        self.seen["train"] = self.model(batch[0]).dtype
        return super().train_step(batch)

    def test_step(self, batch: Any) -> dict[str, Any]:
        self.seen["test"] = self.model(batch[0]).dtype
        return super().test_step(batch)


def test_resolution_on_cpu() -> None:
    assert resolve_precision("auto", CPU) == "fp32"  # documented: auto never picks bf16 on a CPU
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("bfloat16", CPU) == "bf16"
    assert resolve_precision("16-mixed", CPU) == "fp16"
    assert resolve_precision(["bf16", "fp16", "fp32"], CPU) == "bf16"
    assert resolve_precision(["auto", "bf16"], CPU) == "fp32"


def test_a_priority_list_skips_unsupported_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    assert resolve_precision(["bf16", "fp16", "fp32"], CPU) == "fp32"
    with pytest.raises(TrainerConfigError, match="add 'fp32' to the list"):
        resolve_precision(["bf16", "fp16"], CPU)


def test_bad_settings_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="precision 'fp8' is not known"):
        PrecisionMixerAddon(precision="fp8")
    with pytest.raises(ValueError, match="empty list"):
        PrecisionMixerAddon(precision=[])
    with pytest.raises(ValueError, match="init_scale"):
        PrecisionMixerAddon(precision="fp16", init_scale=0)


@pytest.mark.parametrize(
    ("precision", "dtype", "scaled"),
    [("fp32", torch.float32, False), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True)],
)
def test_autocast_uses_the_named_dtype_in_every_phase(precision: str, dtype: torch.dtype, scaled: bool) -> None:
    trainer = tiny_trainer(DtypeProbe.add_on(PrecisionMixerAddon(precision=precision)))
    trainer.run(1, tiny_loader(16), tiny_loader(8))
    assert trainer.seen == {"train": dtype, "test": dtype}
    mixer = trainer.get_addon("precision_mixer")
    assert mixer.resolved == precision and (mixer.scaler is not None) == scaled
    outputs = trainer.inference(tiny_loader(8))
    assert len(outputs) == 1
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32


def test_fp32_is_bit_identical_to_no_addon() -> None:
    plain = tiny_trainer(TinyRegressionTrainer)
    plain.run(2, tiny_loader(shuffle=True, seed=3))
    mixed = tiny_trainer(TinyRegressionTrainer.add_on(PrecisionMixerAddon(precision="fp32")))
    mixed.run(2, tiny_loader(shuffle=True, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), mixed.model.parameters()))


def test_fp16_scaler_skips_an_overflowing_step_and_backs_off() -> None:
    # With scale 2**24 the fp16 backward overflows: GradScaler skips the update and halves the scale.
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(PrecisionMixerAddon(precision="fp16", init_scale=2.0**24)))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.run(1, [next(iter(tiny_loader(8)))])
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert trainer.get_addon("precision_mixer").loss_scale() == 2.0**23


def test_fp16_scaler_state_is_in_the_trainer_state_and_restored() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(PrecisionMixerAddon(precision="fp16", init_scale=2.0**24)))
    trainer.run(1, tiny_loader(16))  # two overflowing steps: 2**24 -> 2**22
    state = trainer.state_dict()["addons"]["precision_mixer"]
    assert state["precision"] == "fp16" and state["scaler"]["scale"] == 2.0**22
    fresh = tiny_trainer(TinyRegressionTrainer.add_on(PrecisionMixerAddon(precision="fp16")))
    fresh.load_state_dict(trainer.state_dict())
    assert fresh.get_addon("precision_mixer").loss_scale() == 2.0**22


def _final_loss(precision: str, device: str = "cpu", epochs: int = 30) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 1))
    cls = TinyRegressionTrainer.add_on(PrecisionMixerAddon(precision=precision, init_scale=256.0))
    trainer = cls(model, device, "train", torch.optim.Adam(model.parameters(), lr=1e-2), None, log_bar=False,
                  handle_signals=False)
    trainer.run(epochs, tiny_loader(96, 16, shuffle=True, seed=1))
    return trainer.epoch_metrics["train/loss"]


def test_bf16_and_fp16_converge_on_cpu_like_fp32() -> None:
    reference = _final_loss("fp32")
    assert reference < 0.05  # the noise floor of the data is 0.01
    for precision in ("bf16", "fp16"):
        assert _final_loss(precision) < max(2 * reference, 0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_converges_on_cuda(precision: str) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    reference = _final_loss("fp32", "cuda")
    assert _final_loss(precision, "cuda") < max(2 * reference, 0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_bf16_on_cuda_where_supported() -> None:
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert resolve_precision("auto", torch.device("cuda")) == expected


def test_configured_by_keyword_and_by_name() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on("precision_mixer"), precision=["bf16", "fp32"])
    assert trainer.get_addon("precision_mixer").resolved == "bf16"


def test_conformance_bf16(tmp_path: Any) -> None:
    report = check_addon(PrecisionMixerAddon, {"precision": "bf16"}, workdir=tmp_path)
    assert report["sync"] == 0


def test_conformance_fp16(tmp_path: Any) -> None:
    # "sync" is left out on purpose: GradScaler.step reads its found-Inf flag on the host every
    # step (PyTorch's design; documented in the module), so fp16 cannot pass a no-sync check.
    report = check_addon(PrecisionMixerAddon, {"precision": "fp16"}, workdir=tmp_path, skip=("sync",))
    assert report["state"] == ["ckpt", "safetensors"]


@pytest.mark.slow
def test_precision_benchmark_runs_and_prints_its_table(tmp_path: Any) -> None:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_precision.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--steps", "3", "--rounds", "1", "--width", "32", "--batch", "8", "--depth", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0] for line in proc.stdout.splitlines()}
    assert {"fp32", "bf16", "fp16"} <= rows
    if not torch.cuda.is_available():
        assert "no CUDA device" in proc.stdout
    assert list(tmp_path.iterdir()) == []
