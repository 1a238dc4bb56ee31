"""The core loop: parity with a raw loop, metrics without stalls, errors that teach, progress."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core_helpers import StepLossTrainer, TinyTrainer, tiny_data, tiny_loader, tiny_trainer
from zae_trainer import (
    AddOn,
    NonFiniteLossError,
    ProgressChecker,
    StepOutputError,
    Trainer,
    TrainerConfigError,
)
from zae_trainer.transfer import move_to_device, resolve_devices

# -- parity ----------------------------------------------------------------------------------


class _MLPTrainer(Trainer):
    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.cross_entropy(self.model(x), y)}

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self.train_step(batch)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))


def _classification_loader() -> DataLoader:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(100, 8, generator=g), torch.randint(0, 4, (100,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5))


def test_parameters_after_two_epochs_are_bit_identical_to_a_raw_pytorch_loop() -> None:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    torch.manual_seed(42)
    loader = _classification_loader()
    for _ in range(2):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sched.step()
    raw = [p.detach().clone() for p in model.parameters()]

    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    torch.manual_seed(42)
    trainer = _MLPTrainer(model, "cpu", "train", opt, sched, log_bar=False, handle_signals=False)
    trainer.run(2, _classification_loader())
    assert all(torch.equal(a, b) for a, b in zip(raw, trainer.model.parameters()))
    assert trainer.progress_checker.step == 14 and trainer.progress_checker.samples == 200


def test_each_step_reuses_the_parameters_gradient_accumulators_and_none_outlive_the_phase() -> None:
    """Every step's graph ends in the same AccumulateGrad nodes: held for the phase, not rebuilt.

    A hook is put on the weight's node in the first step and no reference to the node is kept
    here: it fires at every step only if the trainer keeps that node alive.
    """
    fired: list[int] = []

    class Watching(TinyTrainer):
        def train_step(self, batch: Any) -> dict[str, Any]:
            out = super().train_step(batch)
            if self.progress_checker.step == 0:
                node = out["loss"].grad_fn.next_functions[0][0].next_functions[0][0]  # mse <- linear <- weight
                assert type(node).__name__ == "AccumulateGrad"
                node.register_hook(lambda grads_in, grads_out: fired.append(1))
            return out

    trainer = tiny_trainer(Watching)
    trainer.run(1, tiny_loader(16))
    assert len(fired) == len(tiny_loader(16)) > 1
    assert trainer._grad_nodes == []  # released when the phase ends: nothing kept between runs


# -- metrics -----------------------------------------------------------------------------------


def test_epoch_means_are_weighted_by_batch_size() -> None:
    class ConstantPerBatch(StepLossTrainer):
        def train_step(self, batch: Any) -> dict[str, Any]:
            x, _ = batch
            out = super().train_step(batch)
            out["size"] = torch.tensor(float(x.shape[0]))  # 8, 8, 4
            return out

    trainer = tiny_trainer(ConstantPerBatch)
    trainer.run(1, tiny_loader(20, 8))
    # weighted: (8*8 + 8*8 + 4*4) / 20 = 7.2 ; an unweighted mean would give 6.67
    assert trainer.epoch_metrics["train/size"] == pytest.approx(7.2)
    losses = trainer.step_losses
    assert trainer.epoch_metrics["train/loss"] == pytest.approx((8 * losses[0] + 8 * losses[1] + 4 * losses[2]) / 20)


_CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy", "__index__")


@pytest.fixture()
def conversion_counter(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for name in _CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *args: Any, _name: str = name, _orig: Any = original, **kw: Any) -> Any:
            counts[_name] += 1
            return _orig(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def test_no_tensor_is_converted_to_a_python_number_per_step(conversion_counter: collections.Counter) -> None:
    class WithAccuracy(TinyTrainer):
        def train_step(self, batch: Any) -> dict[str, Any]:
            out = super().train_step(batch)
            out["abs_err"] = out["loss"].detach().sqrt()
            return out

    trainer = tiny_trainer(WithAccuracy, log_every_n_steps=10)
    loader = list(tiny_loader(240, 8))  # 30 steps; a list, since DataLoader.__iter__ itself calls .item()
    conversion_counter.clear()
    trainer.run(1, loader)
    # 3 flushes (steps 10, 20, 30), each one tolist() for the stacked values of the 2 metrics
    assert conversion_counter == collections.Counter({"tolist": 6})
    assert trainer.progress_checker.step == 30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sync_debug_mode_passes_between_log_points() -> None:  # pragma: no cover - GPU only
    model = nn.Linear(3, 1).cuda()
    trainer = TinyTrainer(model, "cuda", "train", torch.optim.SGD(model.parameters(), lr=0.1), None,
                          log_bar=False, log_every_n_steps=1000, handle_signals=False)
    data = tiny_data(256)
    loader = DataLoader(TensorDataset(data.tensors[0].cuda(), data.tensors[1].cuda()), batch_size=8)
    trainer.run(1, loader)  # warm-up

    class NoSyncInsideBatches(AddOn):  # flushes at log points and epoch end happen outside
        def on_train_batch_begin(self, trainer: Any) -> None:
            torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer: Any) -> None:
            torch.cuda.set_sync_debug_mode(0)

    watched = TinyTrainer.add_on(NoSyncInsideBatches)(model, "cuda", "train", trainer.optimizer, None, log_bar=False,
                                                      log_every_n_steps=1000, handle_signals=False)
    try:
        watched.run(1, loader)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# -- bad input --------------------------------------------------------------------------------


def _returning(value: Any) -> type[Trainer]:
    class Returns(TinyTrainer):
        def train_step(self, batch: Any) -> Any:
            out = super().train_step(batch)["loss"]
            return value(out) if callable(value) else value

    return Returns


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (lambda loss: loss, "must return a dict"),
        (lambda loss: {"los": loss}, r"no 'loss' \(keys: \['los'\]\)"),
        (lambda loss: {"loss": 0.5}, "'loss' must be a tensor, got float"),
        (lambda loss: {"loss": loss.expand(4)}, r"must be a scalar, got shape \(4,\)"),
        (lambda loss: {"loss": loss.detach()}, "does not require grad"),
    ],
)
def test_bad_train_step_results_raise_errors_that_name_the_problem(result: Any, message: str) -> None:
    trainer = tiny_trainer(_returning(result))
    with pytest.raises(StepOutputError, match=message) as info:
        trainer.run(1, tiny_loader())
    assert "step 1" in str(info.value)


def test_non_finite_loss_raises_naming_the_step() -> None:
    class NanAtStep3(StepLossTrainer):
        def train_step(self, batch: Any) -> dict[str, Any]:
            out = super().train_step(batch)
            if self.progress_checker.step == 2:  # the third step
                out["loss"] = out["loss"] * float("nan")
            return out

    trainer = tiny_trainer(NanAtStep3)
    with pytest.raises(NonFiniteLossError, match="training loss is nan at step 3") as info:
        trainer.run(1, tiny_loader(48, 8))
    assert info.value.step == 3
    tolerant = tiny_trainer(NanAtStep3, nonfinite_loss="ignore")
    tolerant.run(1, tiny_loader(48, 8))
    assert math.isnan(tolerant.step_losses[2])


def test_run_argument_errors() -> None:
    trainer = tiny_trainer()
    with pytest.raises(TrainerConfigError, match="n_epoch must be an integer >= 1, got 0"):
        trainer.run(0, tiny_loader())
    with pytest.raises(TrainerConfigError, match="loader is empty"):
        trainer.run(1, DataLoader(TensorDataset(torch.zeros(3, 3), torch.zeros(3, 1)), batch_size=8, drop_last=True))
    with pytest.raises(TrainerConfigError, match="valid_loader is empty"):
        trainer.run(1, tiny_loader(), [])


def test_constructor_errors() -> None:
    model = nn.Linear(3, 1)
    with pytest.raises(TrainerConfigError, match="mode must be 'train' or 'test', got 'training'"):
        TinyTrainer(model, "cpu", "training", torch.optim.SGD(model.parameters(), lr=0.1), None)
    other = nn.Linear(3, 1)
    with pytest.raises(TrainerConfigError, match="holds none of the model's parameters"):
        TinyTrainer(model, "cpu", "train", torch.optim.SGD(other.parameters(), lr=0.1), None)
    with pytest.raises(TrainerConfigError, match="needs an optimizer"):
        TinyTrainer(model, "cpu", "train", None, None)
    with pytest.raises(ValueError, match="CUDA device"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        TinyTrainer(model, "cuda:0", "train", torch.optim.SGD(model.parameters(), lr=0.1), None)
    with pytest.raises(TrainerConfigError, match="no add-on distributes the work"):
        TinyTrainer(model, ["cpu", "cpu"], "train", torch.optim.SGD(model.parameters(), lr=0.1), None).run(
            1, tiny_loader()
        )


def test_run_kind_and_phase_are_read_only() -> None:
    trainer = tiny_trainer()
    with pytest.raises(AttributeError):
        trainer.phase = "valid"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        trainer.run_kind = "test"  # type: ignore[misc]
    assert (trainer.run_kind, trainer.phase) == ("train", "train")


# -- schedulers, validation, inference -----------------------------------------------------------


def test_scheduler_steps_per_epoch_or_per_batch() -> None:
    per_epoch = tiny_trainer()
    per_epoch.scheduler = torch.optim.lr_scheduler.StepLR(per_epoch.optimizer, step_size=1, gamma=0.5)
    per_epoch.run(2, tiny_loader(20, 8))
    assert per_epoch.current_lr() == pytest.approx(0.1 * 0.5**2)

    per_batch = tiny_trainer(scheduler_step_on_batch=True)
    per_batch.scheduler = torch.optim.lr_scheduler.StepLR(per_batch.optimizer, step_size=1, gamma=0.5)
    per_batch.run(2, tiny_loader(20, 8))
    assert per_batch.current_lr() == pytest.approx(0.1 * 0.5**6)


def test_reduce_lr_on_plateau_is_stepped_with_the_monitored_metric() -> None:
    class FlatValidation(TinyTrainer):
        def test_step(self, batch: Any) -> dict[str, Any]:
            return {"loss": torch.tensor(1.0)}  # never improves

    trainer = tiny_trainer(FlatValidation, monitor="valid/loss")
    trainer.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(trainer.optimizer, patience=0, factor=0.5)
    trainer.run(3, tiny_loader(), tiny_loader(8, 8, seed=1))
    assert trainer.scheduler.best == 1.0
    assert trainer.current_lr() == pytest.approx(0.1 * 0.5**2)  # epochs 2 and 3 did not improve


def test_reduce_lr_on_plateau_without_the_monitored_metric_is_a_clear_error() -> None:
    trainer = tiny_trainer(monitor="valid/loss", valid_every_n_epochs=2)  # epoch 1 does not validate
    trainer.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(trainer.optimizer)
    with pytest.raises(TrainerConfigError, match="needs the monitored metric 'valid/loss'"):
        trainer.run(2, tiny_loader(), tiny_loader(8, 8, seed=1))


def test_validation_interval_and_last_epoch() -> None:
    trainer = tiny_trainer(valid_every_n_epochs=2)
    trainer.run(3, tiny_loader(), tiny_loader(8, 8, seed=1))
    validated = ["valid/loss" in h for h in trainer.history]
    assert validated == [False, True, True]  # epoch 2 by interval, epoch 3 as the last


def test_inference_returns_outputs_without_touching_logs_or_mode() -> None:
    trainer = tiny_trainer(StepLossTrainer)
    trainer.run(1, tiny_loader())
    history, metrics = list(trainer.step_losses), dict(trainer.epoch_metrics)
    outputs = trainer.inference(tiny_loader(12, 5))
    assert [o.shape for o in outputs] == [(5, 1), (5, 1), (2, 1)]
    assert all(o.device.type == "cpu" and not o.requires_grad for o in outputs)
    assert trainer.phase == "train" and trainer.model.training
    assert trainer.step_losses == history and trainer.epoch_metrics == metrics


def test_test_mode_run_evaluates_without_training() -> None:
    class PhaseSeen(TinyTrainer):
        def record_step(self, outputs: Any, batch_size: int) -> None:
            super().record_step(outputs, batch_size)
            self.seen.append((self.phase, batch_size, tuple(outputs["output"].shape)))

    model = nn.Linear(3, 1)
    trainer = PhaseSeen(model, "cpu", "test", None, None, log_bar=False, handle_signals=False)
    trainer.seen = []
    before = [p.detach().clone() for p in model.parameters()]
    trainer.run(1, tiny_loader())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert set(trainer.epoch_metrics) == {"test/loss"} and trainer.progress_checker.step == 0
    assert trainer.seen == [("test", 8, (8, 1)), ("test", 8, (8, 1)), ("test", 4, (4, 1))]
    assert trainer.run_kind == "test" and trainer.phase == "test"


# -- devices and batches --------------------------------------------------------------------------


def test_device_resolution() -> None:
    assert resolve_devices(None) == [torch.device("cuda" if torch.cuda.is_available() else "cpu")]
    assert resolve_devices("cpu") == [torch.device("cpu")]
    assert resolve_devices(["cpu", torch.device("cpu")]) == [torch.device("cpu")] * 2
    with pytest.raises(ValueError, match="not a device PyTorch knows"):
        resolve_devices("gpu0")


@dataclasses.dataclass
class _Sample:
    image: torch.Tensor
    label: torch.Tensor
    name: str


def test_batches_move_recursively_keeping_their_structure() -> None:
    Pair = collections.namedtuple("Pair", "x y")
    meta = torch.device("meta")
    batch = {
        "pair": Pair(torch.ones(2), torch.zeros(2)),
        "list": [torch.ones(1), "text", 3],
        "sample": _Sample(torch.ones(2), torch.zeros(1), "a"),
        "ordered": collections.OrderedDict(a=torch.ones(1)),
    }
    moved = move_to_device(batch, meta)
    assert isinstance(moved["pair"], Pair) and moved["pair"].x.device == meta
    assert moved["list"][1:] == ["text", 3] and moved["list"][0].device == meta
    assert isinstance(moved["sample"], _Sample) and moved["sample"].image.device == meta
    assert moved["sample"].name == "a"
    assert isinstance(moved["ordered"], collections.OrderedDict) and moved["ordered"]["a"].device == meta
    assert batch["pair"].x.device.type == "cpu"  # the input is not modified


# -- progress ----------------------------------------------------------------------------------------


def test_progress_checker_counts_and_zae_getters() -> None:
    trainer = tiny_trainer()
    pc = trainer.progress_checker
    assert (pc.get_step(), pc.get_epoch()) == (1, 1)
    trainer.run(2, tiny_loader(20, 8))
    assert (pc.step, pc.batches, pc.epoch, pc.samples, pc.batch_in_epoch) == (6, 6, 2, 40, 0)
    assert (pc.get_step(), pc.get_epoch()) == (7, 3)
    state = pc.state_dict()
    restored = ProgressChecker()
    restored.load_state_dict(state)
    assert restored == pc
    restored.init_state()
    assert restored == ProgressChecker()
    with pytest.raises(KeyError, match="unknown keys"):
        restored.load_state_dict({"stepz": 1})


def test_non_interactive_stream_gets_one_line_per_epoch_and_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    trainer = tiny_trainer(log_bar=True)
    trainer.run(3, tiny_loader(), tiny_loader(8, 8, seed=1))
    err = capsys.readouterr().err
    assert "\r" not in err
    epoch_lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/3", "2/3", "3/3"]
    assert "run finished: 3 epoch(s), 9 step(s), 60 sample(s)" in err
    assert "best valid/loss" in err and "final: train/loss" in err


def test_log_bar_false_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    tiny_trainer(log_bar=False).run(1, tiny_loader())
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from core_helpers import Recorder, TinyTrainer, tiny_loader, tiny_trainer

    class SelfSignal(TinyTrainer):
        def train_step(self, batch):
            if self.progress_checker.step == 4:
                os.kill(os.getpid(), signal.{signame})
            return super().train_step(batch)

    trainer = tiny_trainer(SelfSignal.add_on(Recorder), handle_signals=True)
    try:
        trainer.run(100, tiny_loader(80, 8))
    finally:
        print("|".join(trainer.get_addon(Recorder).trace[-3:]), flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(("signame", "code"), [("SIGTERM", 143), ("SIGINT", -signal.SIGINT)])
def test_signal_stops_at_a_batch_boundary_with_interrupt_event_and_conventional_exit(
    tmp_path: Path, signame: str, code: int
) -> None:
    script = tmp_path / "train.py"
    script.write_text(_SIGNAL_SCRIPT.format(tests=str(Path(__file__).parent), signame=signame))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    # SIGTERM -> SystemExit(143); SIGINT -> KeyboardInterrupt, which CPython turns into death by SIGINT
    assert proc.returncode == code, proc.stderr
    last = proc.stdout.strip().split("|")
    assert last == ["TRAIN_BATCH_END e0 s5", "INTERRUPT e0 s5", "RUN_END e0 s5"]
    assert os.listdir(tmp_path) == ["train.py"]


class _TtyStream:
    """A stream that says it is a terminal, so the display animates a tqdm bar."""

    def __init__(self) -> None:
        self.chunks: list[str] = []

    def write(self, text: str) -> int:
        self.chunks.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_interactive_stream_gets_tqdm_bars_with_loss_and_lr_in_the_postfix() -> None:
    from zae_trainer.display import ProgressDisplay, RunSummary

    stream = _TtyStream()
    display = ProgressDisplay(True, stream)  # type: ignore[arg-type]
    display.start(total_epochs=2, first_epoch=0)
    display.epoch_begin(1, total_batches=4)
    for _ in range(4):
        display.batch_done()
    display.show_metrics({"train/loss": 0.25, "train/acc": 0.9}, lr=1e-3)
    assert display._batch_bar.postfix == "loss=0.25, lr=1.00e-03"
    display.epoch_end(1, 2, {"train/loss": 0.25}, 0.1)
    display.close(RunSummary(epochs=1, steps=4, status="finished"))
    text = "".join(stream.chunks)
    assert "\r" in text and "run finished: 1 epoch(s), 4 step(s)" in text


def test_a_run_resumed_mid_epoch_reports_the_same_epoch_means() -> None:
    stop_at = 3

    class StopMidEpoch(StepLossTrainer):
        def train_step(self, batch: Any) -> dict[str, Any]:
            if self.progress_checker.step == stop_at and not getattr(self, "resumed", False):
                raise RuntimeError("simulated crash")
            return super().train_step(batch)

    reference = tiny_trainer(StepLossTrainer, log_every_n_steps=2)
    reference.run(1, tiny_loader(48, 8))

    crashed = tiny_trainer(StopMidEpoch, log_every_n_steps=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.run(1, tiny_loader(48, 8))
    state = crashed.state_dict()  # 3 steps done: 2 flushed, 1 pending
    assert state["metrics"]["train"]["pending_steps"] == [3]

    resumed = tiny_trainer(StopMidEpoch, log_every_n_steps=2)
    resumed.resumed = True
    resumed.load_state_dict(state)
    resumed.run(1, tiny_loader(48, 8))
    assert resumed.progress_checker.step == 6
    assert resumed.epoch_metrics["train/loss"] == pytest.approx(reference.epoch_metrics["train/loss"], rel=1e-12)
    assert crashed.step_losses + resumed.step_losses == pytest.approx(reference.step_losses, rel=1e-12)
