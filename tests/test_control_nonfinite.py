"""NonFiniteGuardAddon: raise (deferred, no per-step sync), skip (state untouched), stop (with a checkpoint)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from zae_trainer import AddOn, NonFiniteLossError, SkipStep
from zae_trainer.addons.checkpoint.formats import read_weights
from zae_trainer.addons.checkpoint.manifest import Manifest
from zae_trainer.addons.clipping import GradientClippingAddon
from zae_trainer.addons.nonfinite import NonFiniteGuardAddon
from zae_trainer.addons.precision import PrecisionMixerAddon
from zae_trainer.addons.state_manager import StateManagerAddon
from zae_trainer.testing import TinyRegressionTrainer, check_addon, tiny_loader, tiny_trainer


def _batches(n: int = 6, nan_at: tuple[int, ...] = ()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of 8; the 1-based batches in ``nan_at`` carry a NaN input (NaN loss and grads)."""
    batches = [tuple(t.clone() for t in b) for b in tiny_loader(8 * n)]
    for i in nan_at:
        batches[i - 1][0][0, 0] = float("nan")
    return batches  # type: ignore[return-value]


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


class BadGradAt(TinyRegressionTrainer):
    bad_step = 1

    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        out = self.model(x)
        if self.progress_checker.step + 1 == self.bad_step:
            out = _InfGrad.apply(out)
        return {"loss": nn.functional.mse_loss(out, y)}


class Snapshots(AddOn):
    """Parameters and optimizer state after every training batch."""

    def __init__(self) -> None:
        self.taken: list[tuple[list[torch.Tensor], dict[str, Any], bool]] = []

    def on_train_batch_end(self, trainer: Any) -> None:
        params = [p.detach().clone() for p in trainer.model.parameters()]
        grads_cleared = all(p.grad is None for p in trainer.model.parameters())
        self.taken.append((params, copy.deepcopy(trainer.optimizer.state_dict()), grads_cleared))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _adam_trainer(cls: type, **settings: Any) -> Any:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    settings.setdefault("log_bar", False)
    settings.setdefault("handle_signals", False)
    return cls(model, "cpu", "train", torch.optim.Adam(model.parameters(), lr=0.05), None, **settings)


# -- raise ------------------------------------------------------------------------------------
def test_raise_names_the_step_and_values_at_the_next_log_point() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(NonFiniteGuardAddon), log_every_n_steps=2)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run(1, _batches(6, nan_at=(3,)))
    error = info.value
    assert error.step == 3 and error.__notes__ == ["raised by add-on 'nonfinite_guard' while handling Event.TRAIN_BATCH_END"]
    assert "non-finite loss at step 3" in str(error) and "loss=nan" in str(error) and "gradient norm=nan" in str(error)
    assert "To fix" in str(error)
    assert trainer.progress_checker.step == 4  # deferred to the log point after step 3, no per-step read


def test_raise_checks_the_epochs_last_batch_before_the_core_reads_the_losses() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(NonFiniteGuardAddon), log_every_n_steps=100)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run(2, _batches(6, nan_at=(6,)))
    # the guard's own report (with the gradient norm) from the last batch's end, not the core's
    assert info.value.__notes__ == ["raised by add-on 'nonfinite_guard' while handling Event.TRAIN_BATCH_END"]
    assert "non-finite loss at step 6" in str(info.value) and "gradient norm=" in str(info.value)
    assert trainer.progress_checker.step == 6 and trainer.progress_checker.epoch == 0


def test_raise_catches_non_finite_gradients_with_a_finite_loss() -> None:
    cls = type("B", (BadGradAt,), {"bad_step": 2}).add_on(NonFiniteGuardAddon)
    trainer = tiny_trainer(cls, log_every_n_steps=100)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run(1, _batches(6))
    error = info.value
    assert error.step == 2
    assert "non-finite gradient norm at step 2" in str(error)
    assert trainer.progress_checker.step == 6  # found at epoch end: the log point never came


class ShapedLoss(TinyRegressionTrainer):
    """A loss of shape (1,) (``reshape(1)``) or in bf16: the guard's one read per interval must
    cope with shapes that do not stack with the 0-dim norms, and with mixed dtypes."""

    shape: tuple[int, ...] = (1,)
    dtype = torch.float32

    def train_step(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model(x), y).to(self.dtype).reshape(self.shape)}


@pytest.mark.parametrize("shape, dtype", [((1,), torch.float32), ((), torch.bfloat16), ((1,), torch.bfloat16)])
@pytest.mark.parametrize("with_clipper", [False, True])
def test_raise_reads_losses_of_other_shapes_and_dtypes(shape: tuple[int, ...], dtype: torch.dtype, with_clipper: bool) -> None:
    addons: list[Any] = [NonFiniteGuardAddon]
    if with_clipper:
        addons.append(GradientClippingAddon(max_norm=1e6))  # the guard then reads the clipper's fp32 norm
    cls = type("S", (ShapedLoss,), {"shape": shape, "dtype": dtype}).add_on(*addons)
    trainer = tiny_trainer(cls, log_every_n_steps=3)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run(1, _batches(6, nan_at=(5,)))
    assert info.value.step == 5 and "loss=nan" in str(info.value) and "gradient norm=nan" in str(info.value)
    assert trainer.progress_checker.step == 6  # the log point after step 5
    assert trainer.addon_of(NonFiniteGuardAddon).last_bad[0] == 5


def test_raise_reads_finite_values_back_as_they_were() -> None:
    """The steps before the bad one were read too, and found finite: the first bad step is named."""
    cls = type("S", (ShapedLoss,), {"shape": (1,)}).add_on(NonFiniteGuardAddon)
    trainer = tiny_trainer(cls, log_every_n_steps=10)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run(1, _batches(6, nan_at=(4, 5)))
    assert info.value.step == 4


def test_read_together_is_one_list_of_floats_in_order() -> None:
    from zae_trainer.addons.nonfinite import _read_together

    values = [torch.tensor(1.5), torch.tensor(2.0, dtype=torch.bfloat16), torch.tensor([3.25]), torch.tensor(float("inf"))]
    assert _read_together(values) == [1.5, 2.0, 3.25, float("inf")]
    assert _read_together([torch.tensor([1.0]), torch.tensor([2.0])]) == [1.0, 2.0]  # all (1,): flattened


def test_raise_keeps_the_state_manager_from_saving_a_poisoned_model(tmp_path: Path) -> None:
    cls = type("B", (BadGradAt,), {"bad_step": 2}).add_on(NonFiniteGuardAddon, StateManagerAddon(save_path=str(tmp_path)))
    trainer = tiny_trainer(cls, log_every_n_steps=100)
    with pytest.warns(RuntimeWarning, match="no emergency checkpoint"), pytest.raises(NonFiniteLossError):
        trainer.run(1, _batches(6))
    assert Manifest.load(str(tmp_path)).entries == []


# -- skip -------------------------------------------------------------------------------------
def test_skip_leaves_parameters_and_optimizer_state_unchanged() -> None:
    trainer = _adam_trainer(TinyRegressionTrainer.add_on(NonFiniteGuardAddon(policy="skip"), Snapshots))
    assert trainer.nonfinite_loss == "ignore"  # the guard decides; the core must not raise afterwards
    trainer.run(1, _batches(6, nan_at=(3,)))
    taken = trainer.get_addon("Snapshots").taken
    params2, opt2, _ = taken[1]
    params3, opt3, cleared3 = taken[2]
    assert _equal(params2, params3) and _equal(opt2, opt3) and cleared3  # step 3 skipped, grads dropped
    assert not _equal(taken[3][0], params3)  # training went on
    pc = trainer.progress_checker
    assert (pc.step, pc.skipped_steps) == (6, 1)
    guard = trainer.get_addon("nonfinite_guard")
    assert guard.skipped == 1 and guard.last_bad is not None and guard.last_bad[0] == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    without = _adam_trainer(TinyRegressionTrainer)
    good = _batches(6)
    without.run(1, good[:2] + good[3:])  # the same run with the bad batch left out
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), without.model.parameters()))


def test_skip_drops_a_whole_accumulation_group() -> None:
    trainer = _adam_trainer(TinyRegressionTrainer.add_on(NonFiniteGuardAddon(policy="skip"), Snapshots),
                            accumulate_grad_batches=2)
    trainer.run(1, _batches(6, nan_at=(4,)))  # groups (1,2) (3,4) (5,6): the second is skipped
    taken = trainer.get_addon("Snapshots").taken
    assert _equal(taken[1][:2], taken[3][:2])
    assert (trainer.progress_checker.step, trainer.progress_checker.skipped_steps) == (3, 1)


def test_skip_under_fp16_leaves_the_scaler_usable() -> None:
    cls = TinyRegressionTrainer.add_on(PrecisionMixerAddon(precision="fp16", init_scale=256.0),
                                       NonFiniteGuardAddon(policy="skip"), Snapshots)
    trainer = _adam_trainer(cls)
    trainer.run(1, _batches(6, nan_at=(2,)))
    taken = trainer.get_addon("Snapshots").taken
    assert _equal(taken[0][:2], taken[1][:2]) and not _equal(taken[1][0], taken[2][0])
    assert trainer.progress_checker.skipped_steps == 1
    assert trainer.get_addon("precision_mixer").loss_scale() == 256.0  # never unscaled: scale untouched


def test_a_skip_after_the_unscale_is_settled_by_the_precision_addon() -> None:
    class SkipFirst(AddOn):
        runs_after = ("precision_mixer",)

        def on_before_optimizer_step(self, trainer: Any) -> None:
            if trainer.progress_checker.step == 0:
                raise SkipStep("test")

    cls = TinyRegressionTrainer.add_on(PrecisionMixerAddon(precision="fp16", init_scale=256.0), SkipFirst)
    trainer = tiny_trainer(cls)
    trainer.run(1, _batches(3))  # without settling, step 2's unscale_ would raise
    assert trainer.progress_checker.skipped_steps == 1
    assert trainer.get_addon("precision_mixer").scaler.state_dict()["_growth_tracker"] == 3


# -- stop -------------------------------------------------------------------------------------
def test_stop_ends_the_run_and_checkpoints_the_last_good_state(tmp_path: Path) -> None:
    cls = TinyRegressionTrainer.add_on(NonFiniteGuardAddon(policy="stop"), StateManagerAddon(save_path=str(tmp_path)),
                                       Snapshots)
    trainer = _adam_trainer(cls)
    trainer.run(3, _batches(6, nan_at=(4,)))
    assert trainer.stop_reason is not None and "non-finite step 4" in trainer.stop_reason
    assert trainer.progress_checker.batches == 4 and trainer.summary.status == "stopped"
    entries = [e for e in Manifest.load(str(tmp_path)).entries if "nonfinite" in e.reasons]
    assert len(entries) == 1 and (entries[0].step, entries[0].batch_in_epoch) == (4, 4)
    saved = read_weights(os.path.join(str(tmp_path), entries[0].name))
    good = trainer.get_addon("Snapshots").taken[2][0]  # after step 3
    assert all(torch.equal(saved[k], v) for k, v in zip(("weight", "bias"), good))


def test_stop_without_a_state_manager_just_stops() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(NonFiniteGuardAddon(policy="stop")))
    trainer.run(2, _batches(6, nan_at=(2,)))
    assert trainer.progress_checker.batches == 2 and trainer.progress_checker.skipped_steps == 1


# -- settings and conformance -----------------------------------------------------------------
def test_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="policy must be one of"):
        NonFiniteGuardAddon(policy="ignore")  # type: ignore[arg-type]


def test_configured_by_keyword_and_by_name() -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on("nonfinite_guard"), policy="skip", check_grads=False)
    guard = trainer.get_addon("nonfinite_guard")
    assert (guard.policy, guard.check_grads) == ("skip", False)


def test_conformance_raise(tmp_path: Path) -> None:
    report = check_addon(NonFiniteGuardAddon, workdir=tmp_path)
    assert report["sync"] <= 1  # the one read is the check's own artefact: its loader's "last batch"


def test_conformance_skip(tmp_path: Path) -> None:
    # "sync" left out on purpose: deciding to skip before the optimizer step needs one host read
    # per step (documented in the module); test_skip_reads_the_device_once_per_step pins that cost.
    check_addon(NonFiniteGuardAddon, {"policy": "skip"}, workdir=tmp_path, skip=("sync",))


def test_skip_reads_the_device_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(NonFiniteGuardAddon(policy="skip")), log_every_n_steps=100)
    batches = _batches(6)
    trainer.run(1, batches[:1])
    reads = []
    original = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or original(self))
    trainer.run(1, batches[1:])  # the epoch end reads its sums with tolist, not item
    assert len(reads) == 5
