"""NonFiniteGuardAddon: what to do when a step's loss or gradients are NaN or infinite.

Policies, and what each costs:

``"raise"`` (default)
    Every optimizer step, references to the step's loss and total gradient norm are kept
    **on the device** (no arithmetic per step); at the next log point (``log_every_n_steps``)
    and after the epoch's last batch they are read in one transfer, and the first non-finite
    step raises :class:`~zae_trainer.errors.NonFiniteLossError` naming the step and both
    values (its own type: a note names the guard and the event). No per-step synchronisation; the price is
    that up to ``log_every_n_steps - 1`` further steps run before the error, exactly like the
    core's own ``nonfinite_loss="raise"`` check of the loss.
``"skip"``
    The step is skipped through ``SkipStep``: parameters and optimizer state stay unchanged,
    the gradients are dropped, ``progress_checker.skipped_steps`` counts it, training goes on.
``"stop"``
    As ``"skip"``, then ``trainer.request_stop(reason)``; with the state manager present, a
    checkpoint (reason ``"nonfinite"``) is written at the end of that batch, from the
    parameters before the bad step.

``"skip"`` and ``"stop"`` must decide *before* the optimizer step, on the host, so they read
one flag from the device per optimizer step (one fused ``isfinite`` over the loss and the
gradient norm, one ``.item()``); on a GPU that stalls the CPU until the step's backward has
finished. Under DDP the flag is also summed over processes (one small all-reduce per step)
so every rank skips the same steps. With these two policies the guard switches the core's
``nonfinite_loss`` check to ``"ignore"``: the skipped batch's loss is still recorded, so the
epoch mean of ``train/loss`` is NaN for an epoch with a skipped step; monitor a validation
metric for checkpoints and early stopping.

The gradient norm costs one extra pass over the gradients per step (``check_grads=False``
turns it off), except with ``"raise"`` beside ``GradientClippingAddon``: the guard then checks
the norm the clipper computed for that step (``last_norm``) instead of computing it again. Under fp16 loss scaling, Inf/NaN gradients are expected from time to time and
handled by the ``GradScaler`` (it skips those updates itself), so only the loss is checked.

Ordering: the guard wraps ``backward`` outside the precision strategy (it sees the loss before
loss scaling) and runs before it in ``BEFORE_OPTIMIZER_STEP`` (``runs_before =
("precision_mixer", "gradient_clipping")``), so a skipped step is never unscaled or clipped.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch

from ..addon import AddOn
from ..errors import NonFiniteLossError, SkipStep
from .clipping import GradientClippingAddon
from .precision import PrecisionMixerAddon

__all__ = ["NonFiniteGuardAddon"]

_log = logging.getLogger("zae_trainer")
_POLICIES = ("raise", "skip", "stop")
_FIX = (
    "To fix, lower the learning rate, clip gradients (GradientClippingAddon), check the data for NaN/Inf, "
    "prefer bf16 to fp16, or use NonFiniteGuardAddon(policy='skip') to skip such steps."
)


class _LossWatch:
    """Strategy: hand each backward's loss to the guard (a detached reference: no copy, no sync)."""

    def backward(self, loss: torch.Tensor) -> None:
        # ``.data`` of a plain tensor: the values without the graph and without a dispatcher
        # trip (``detach()`` costs ~1,200 instructions more); only ever read.
        kept = loss.data if type(loss) is torch.Tensor else loss.detach()
        self.addon_of(NonFiniteGuardAddon)._losses.append(kept)  # type: ignore[attr-defined]
        super().backward(loss)  # type: ignore[misc]


class NonFiniteGuardAddon(AddOn):
    """Raise on, skip, or stop at a step whose loss or gradient norm is NaN/Inf.

    Parameters
    ----------
    policy : {"raise", "skip", "stop"}
        See the module docstring for what each does and costs.
    check_grads : bool
        Also check the total gradient norm (one extra pass over the gradients per step).

    Attributes
    ----------
    skipped : int
        Steps this guard skipped (in checkpoints). ``last_bad`` holds ``(step, loss,
        grad_norm)`` of the latest non-finite step it handled.

    Examples
    --------
    >>> MyTrainer.add_on(NonFiniteGuardAddon(policy="skip"))  # doctest: +SKIP
    >>> MyTrainer.add_on("nonfinite_guard", "state_manager")(model, optimizer=opt, policy="stop",
    ...                                                       save_path="ckpts")  # doctest: +SKIP
    """

    name = "nonfinite_guard"
    runs_before = ("precision_mixer", "gradient_clipping")
    trainer_mixin = _LossWatch

    def __init__(self, *, policy: Literal["raise", "skip", "stop"] = "raise", check_grads: bool = True) -> None:
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {list(_POLICIES)}, got {policy!r}")
        self.policy = policy
        self.check_grads = bool(check_grads)
        self.skipped = 0
        self.last_bad: tuple[int, float, float] | None = None
        self._losses: list[torch.Tensor] = []  # this accumulation group's (loss / N) values
        # "raise": (step, loss, grad norm or None) per optimizer step, all still on the device
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        self._awaiting: tuple[int, torch.Tensor] | None = None  # loss whose norm the clipper computes
        self._clipper: Any = None
        self._save_after_batch = False
        self._skipping: tuple[int, str] | None = None  # (step, reason) of the step being skipped
        self._norm_checked = self.check_grads
        self._epoch_length: int | None = None
        self._zero = torch.zeros(())

    def setup(self, trainer: Any) -> None:
        self._zero = torch.zeros((), device=trainer.device)
        if self.policy != "raise":
            trainer.set_nonfinite_loss("ignore")  # this guard decides; the core must not raise afterwards

    def on_run_begin(self, trainer: Any) -> None:
        # Known only now: the precision add-on creates its scaler in its own setup.
        self._norm_checked = self.check_grads and not self._loss_scaled(trainer)
        clipper = trainer.addon_of(GradientClippingAddon)
        # "raise" reads the norm the clipper computes anyway instead of a second pass.
        self._clipper = clipper if clipper is not None and clipper.computes_norm and self.policy == "raise" else None

    # -- per optimizer step --------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Any) -> None:
        losses, self._losses = self._losses, []
        if not losses:  # several optimizers: the first one's hook checked the step for all of them
            skipping = self._skipping
            if skipping is not None and skipping[0] == trainer.progress_checker.step + 1:
                raise SkipStep(skipping[1])
            return
        step = trainer.progress_checker.step + 1
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()  # sum of loss / N: the group mean
        if self.policy == "raise":  # no arithmetic per step: references only, read at log points
            if not self._norm_checked:
                self._pending.append((step, loss, None))
            elif self._clipper is not None:
                self._awaiting = (step, loss)  # the clipper's norm of this step is taken at batch end
            else:
                self._pending.append((step, loss, self._grad_norm(trainer)))
            return
        values = torch.stack([loss.float().reshape(()), self._grad_norm(trainer)])
        flag = float((~torch.isfinite(values)).any().item())  # the one host read per step
        if trainer.world_size > 1:
            flag = trainer.all_reduce_sums([flag])[0]  # every rank skips the same steps
        if flag:
            self._handle(trainer, step, values.tolist())

    def _grad_norm(self, trainer: Any) -> torch.Tensor:
        if self._norm_checked:
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            if grads:
                return torch.nn.utils.get_total_norm(grads).float().reshape(())
        return self._zero

    @staticmethod
    def _loss_scaled(trainer: Any) -> bool:
        return getattr(trainer.addon_of(PrecisionMixerAddon), "scaler", None) is not None

    def _handle(self, trainer: Any, step: int, values: list[float]) -> None:
        loss, norm = values
        self.skipped += 1
        self.last_bad = (step, loss, norm)
        reason = f"non-finite step {step}: loss={loss}, gradient norm={self._norm_text(norm)}"
        self._skipping = (step, reason)
        if self.policy == "stop":
            trainer.request_stop(reason)
            self._save_after_batch = True
            _log.warning("%s; skipped it and stopping", reason)
        else:
            _log.warning("%s; skipped it (%d skipped so far)", reason, self.skipped)
        raise SkipStep(reason)

    def on_train_batch_end(self, trainer: Any) -> None:
        if self._awaiting is not None:
            step, loss = self._awaiting
            self._awaiting = None
            last = self._clipper.last_norm
            # a step skipped by another add-on after this guard ran was never clipped: loss only
            self._pending.append((step, loss, last[1] if last is not None and last[0] == step else None))
        if self._save_after_batch:
            self._save_after_batch = False
            save = getattr(trainer, "save_state", None)
            if callable(save):
                save("nonfinite")
        if self._pending:
            pc = trainer.progress_checker
            if pc.step % trainer.log_every_n_steps == 0 or pc.batch_in_epoch == self._epoch_length:
                self._check_pending(trainer)

    def on_epoch_begin(self, trainer: Any) -> None:
        # the epoch's last batch is checked before the core's own epoch-end check reads the losses
        self._epoch_length = _length(trainer.loader)

    # -- "raise": checked at log points, after the epoch's last batch, before validation --------------------
    def on_valid_begin(self, trainer: Any) -> None:
        self._check_pending(trainer)

    def on_epoch_end(self, trainer: Any) -> None:
        self._check_pending(trainer)

    def _check_pending(self, trainer: Any) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        zero = self._zero
        values = [loss for _, loss, _ in pending] + [zero if norm is None else norm for _, _, norm in pending]
        read = _read_together(values)  # one transfer for the interval
        count = len(pending)
        for (step, _, _), loss, norm in zip(pending, read[:count], read[count:]):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                self.last_bad = (step, loss, norm)
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                raise NonFiniteLossError(
                    f"non-finite {what} at step {step} (epoch {trainer.progress_checker.epoch + 1}): loss={loss}, "
                    f"gradient norm={self._norm_text(norm)}. {_FIX}",
                    step,
                )

    def _norm_text(self, norm: float) -> str:
        return str(norm) if self._norm_checked else "not checked"

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))


def _read_together(values: list[torch.Tensor]) -> list[float]:
    """The one-element tensors ``values`` as floats, read in one transfer.

    Losses and norms are 0-dim tensors in the usual case, stacked as they are (``stack``
    promotes mixed dtypes, bf16 beside fp32 say). A ``reshape(())`` per value would cost
    ~13,000 instructions each, twice per step of the interval, so it is only the fallback for
    other one-element shapes (a loss of shape ``(1,)``).
    """
    try:
        together = torch.stack(values)
    except RuntimeError:  # shapes differ: () beside (1,)
        together = torch.stack([value.reshape(()) for value in values])
    return [float(v) for v in (together if together.dim() == 1 else together.reshape(-1)).tolist()]


def _length(loader: Any) -> int | None:
    """Batches in an epoch of ``loader``; None for an iterable without a length (the checks
    before validation and at epoch end remain)."""
    try:
        return len(loader)
    except TypeError:
        return None
