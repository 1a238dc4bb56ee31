"""AccelerateAddon on the CPU: in one process it trains exactly like the plain trainer; under a
launcher with two gloo processes, like one process with double batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ddp_helpers import ddp_trainer, loader, params
from test_ddp_launchers import run_under_torchrun
from zae_trainer import AddOnDefinitionError, TrainerConfigError
from zae_trainer.addons.accelerate import AccelerateAddon
from zae_trainer.addons.clipping import GradientClippingAddon
from zae_trainer.addons.multi_gpu import MultiGPUAddon
from zae_trainer.addons.state_manager import StateManagerAddon
from zae_trainer.testing.tiny import TinyRegressionTrainer, tiny_trainer

pytest.importorskip("accelerate")


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Any:
    """Accelerate keeps process-wide state; each test starts from none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_one_process_trains_exactly_like_the_plain_trainer() -> None:
    trainer = ddp_trainer(AccelerateAddon, GradientClippingAddon, accumulate_grad_batches=2, max_norm=0.5)
    trainer.run(2, loader(48, batch_size=8), loader(20, batch_size=8, seed=7))
    reference = ddp_trainer(GradientClippingAddon, accumulate_grad_batches=2, max_norm=0.5)
    reference.run(2, loader(48, batch_size=8), loader(20, batch_size=8, seed=7))

    assert all(torch.equal(a, b) for a, b in zip(params(trainer), params(reference)))
    assert trainer.epoch_metrics == reference.epoch_metrics
    assert trainer.is_main_process and trainer.world_size == 1
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    trainer.run(1, loader(48, batch_size=8))  # a second run reuses the prepared model and optimizer
    assert trainer.progress_checker.epoch == 3


class DtypeRecorder(TinyRegressionTrainer):
    """Records the autocast dtype its train_step runs under (accelerate returns fp32 outputs)."""

    dtypes: list[torch.dtype] = []

    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        out = self.model(x)
        enabled = torch.is_autocast_enabled("cpu")
        DtypeRecorder.dtypes.append(torch.get_autocast_dtype("cpu") if enabled else out.dtype)
        return {"loss": torch.nn.functional.mse_loss(out.float(), y)}


def test_bf16_mixed_precision_runs_the_step_under_accelerate_autocast() -> None:
    DtypeRecorder.dtypes = []
    trainer = tiny_trainer(DtypeRecorder.add_on(AccelerateAddon(mixed_precision="bf16")))
    trainer.run(1, loader(16, batch_size=8))
    assert DtypeRecorder.dtypes == [torch.bfloat16, torch.bfloat16]
    assert trainer.raw_model.weight.dtype == torch.float32  # weights stay full precision
    assert torch.isfinite(torch.tensor(trainer.epoch_metrics["train/loss"]))


def test_checkpoints_hold_the_plain_model(tmp_path) -> None:
    trainer = ddp_trainer(AccelerateAddon, StateManagerAddon, save_path=str(tmp_path))
    trainer.run(1, loader(16, batch_size=8))
    single = ddp_trainer(StateManagerAddon, save_path=str(tmp_path))
    single.load_state("latest")
    assert all(torch.equal(a, b) for a, b in zip(params(single), params(trainer)))


def test_conflicts_are_refused_when_the_class_is_built() -> None:
    with pytest.raises(AddOnDefinitionError, match="conflict"):
        TinyRegressionTrainer.add_on(AccelerateAddon, MultiGPUAddon)
    with pytest.raises(ValueError, match="mixed_precision"):
        AccelerateAddon(mixed_precision="fp12")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_processes_under_a_launcher_match_one_process_with_double_batch(tmp_path) -> None:
    reports = run_under_torchrun(tmp_path / "out", "accelerate")
    reference = ddp_trainer()
    reference.run(2, loader(48, batch_size=8), loader(20, batch_size=8, seed=7))
    expected = [p.flatten().tolist() for p in params(reference)]
    for rank, report in enumerate(reports):
        assert report["world_size"] == 2 and report["is_main"] is (rank == 0)
        for got, want in zip(report["params"], expected):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
        assert report["metrics"]["valid/loss"] == pytest.approx(reference.epoch_metrics["valid/loss"], rel=1e-5)
        assert report["metrics"]["train/loss"] == pytest.approx(reference.epoch_metrics["train/loss"], rel=1e-5)


def test_conformance_in_one_process(tmp_path) -> None:
    from zae_trainer.testing import check_addon

    # "compose" combines every built-in, precision_mixer included, which this add-on refuses by design.
    report = check_addon(AccelerateAddon, workdir=tmp_path, skip=("compose",))
    assert report["sync"] == 0


@pytest.mark.parametrize(
    ("variable", "mode"),
    [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED"),
     ("ACCELERATE_USE_MEGATRON_LM", "MEGATRON_LM")],
)
def test_untested_accelerate_modes_from_the_launch_config_are_refused_at_construction(
    monkeypatch, variable: str, mode: str
) -> None:
    # What `accelerate launch` with an FSDP/DeepSpeed/Megatron config exports to each process.
    monkeypatch.setenv(variable, "true")
    with pytest.raises(TrainerConfigError) as info:
        ddp_trainer(AccelerateAddon)
    message = str(info.value)
    assert f"Accelerate's {mode} mode" in message and "FSDPAddon" in message and variable in message


def test_an_fsdp_plugin_object_is_refused_and_plain_accelerate_still_builds(monkeypatch) -> None:
    from accelerate import FullyShardedDataParallelPlugin

    with pytest.raises(TrainerConfigError, match="FSDP mode"):
        ddp_trainer(AccelerateAddon(accelerator_kwargs={"fsdp_plugin": FullyShardedDataParallelPlugin(fsdp_version=2)}))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    trainer = ddp_trainer(AccelerateAddon)
    assert trainer.addon_of(AccelerateAddon).accelerator.distributed_type.value == "NO"
