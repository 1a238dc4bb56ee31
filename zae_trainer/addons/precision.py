"""PrecisionMixerAddon: mixed precision as a strategy (autocast, loss scaling, unscale before clip).

What it changes, and where:

* ``autocast`` — ``train_step`` / ``test_step`` / ``inference`` run under
  ``torch.autocast(device_type, dtype)`` with the dtype the setting names (bf16 means bf16).
* ``backward`` — for fp16, the loss is multiplied by the ``GradScaler``'s scale first, so small
  gradients do not underflow; other precisions pass the loss through unchanged.
* ``BEFORE_OPTIMIZER_STEP`` — for fp16, the gradients are unscaled **once**, in place, before
  any other add-on reads them. Gradient clipping (``runs_after = ("precision_mixer",)``) runs
  after this hook, so it sees true gradient values. With fp32 or bf16 (no scaler) the add-on
  leaves its per-step hooks out of dispatch (``idle_events``), and the loop calls past its
  overrides that have nothing to do (``idle_overrides``): fp32 costs no call per step.
* ``optimizer_step`` — for fp16, ``GradScaler.step`` (which skips the update when it found
  Inf/NaN gradients) then ``GradScaler.update`` (which adapts the scale).

How ``precision`` is resolved (once, when the trainer is built, from ``trainer.device``):

=============  ===========================================  =========================================
setting        CUDA                                         CPU
=============  ===========================================  =========================================
``"fp32"``     no autocast                                  no autocast
``"bf16"``     autocast bfloat16 (needs compute capability  autocast bfloat16
               8.0+, else a ``TrainerConfigError``)
``"fp16"``     autocast float16 + ``GradScaler``            autocast float16 + ``GradScaler("cpu")``:
                                                            works, but is usually *slower* than fp32
``"auto"``     bf16 where supported, else fp16              fp32 (see below)
a list         the first supported entry, e.g. ``["bf16", "fp16", "fp32"]``
=============  ===========================================  =========================================

Why ``"auto"`` is fp32 on a CPU: bf16 autocast speeds a CPU up only where it has native bf16
arithmetic (AMX / AVX512-BF16), which PyTorch does not report through a public API; elsewhere
it is slower than fp32 and always less precise (``benchmarks/bench_precision.py`` measures
it). A setting whose meaning changes with the CPU model would also make the same script give
different numbers on different machines. Ask for ``"bf16"`` explicitly to use it on a CPU.

Cost: fp16's ``GradScaler.step`` reads one flag from the device every optimizer step (PyTorch
decides on the host whether to skip the update); bf16 and fp32 add no synchronisation. A step
skipped by the scaler is PyTorch's normal fp16 behaviour and is not counted in
``progress_checker.skipped_steps``; per-step schedulers still step.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator, Sequence

import torch

from ..addon import AddOn
from ..errors import TrainerConfigError
from ..events import Event

__all__ = ["PrecisionMixerAddon", "resolve_precision"]

_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "32": "fp32",
    "fp16": "fp16", "float16": "fp16", "16": "fp16", "16-mixed": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "bf16-mixed": "bf16",
    "auto": "auto",
}  # fmt: skip
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _canonical(value: Any) -> str:
    key = str(value).strip().lower()
    if key not in _ALIASES:
        raise ValueError(
            f"precision {value!r} is not known. To fix, use 'auto', 'fp32', 'fp16', 'bf16' or a priority "
            "list such as ['bf16', 'fp16', 'fp32']."
        )
    return _ALIASES[key]


def _unsupported_because(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` cannot run on ``device`` (None when it can)."""
    if precision == "fp32":
        return None
    if not torch.amp.is_autocast_available(device.type):
        return f"torch.autocast does not support device type {device.type!r}"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bfloat16 support (compute capability 8.0+ needed)"
    return None


def resolve_precision(precision: str | Sequence[str], device: torch.device) -> str:
    """The concrete precision (``"fp32"``, ``"fp16"`` or ``"bf16"``) to use on ``device``.

    Parameters
    ----------
    precision : str or sequence of str
        ``"auto"``, a precision name, or a priority list whose first supported entry wins.
    device : torch.device
        The training device.

    Examples
    --------
    >>> resolve_precision("auto", torch.device("cpu"))
    'fp32'
    >>> resolve_precision(["bf16", "fp32"], torch.device("cpu"))
    'bf16'
    """
    choices = [precision] if isinstance(precision, str) else list(precision)
    if not choices:
        raise ValueError("precision is an empty list. To fix, name at least one, e.g. ['bf16', 'fp32'].")
    reasons = []
    for choice in choices:
        name = _canonical(choice)
        if name == "auto":
            if device.type == "cuda":
                return "bf16" if _unsupported_because("bf16", device) is None else "fp16"
            return "fp32"
        reason = _unsupported_because(name, device)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    raise TrainerConfigError(
        f"none of the precisions {choices} can run on {device}: {'; '.join(reasons)}. To fix, add 'fp32' to "
        "the list as a fallback, or train on a device that supports them."
    )


@contextlib.contextmanager
def _within(outer: ContextManager[Any], device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """Autocast inside whatever context the strategies below this one provide."""
    with outer, torch.autocast(device_type=device_type, dtype=dtype):
        yield


class _MixedPrecisionStrategy:
    """Trainer methods the add-on overrides; each chains with ``super()``.

    The add-on is found with ``addon_of`` (one dictionary lookup bound at construction); with
    fp32 each method only passes through, and ``autocast`` returns the core's no-op context,
    which the loop does not enter.
    """

    def autocast(self) -> ContextManager[Any]:
        mixer = self.addon_of(PrecisionMixerAddon)  # type: ignore[attr-defined]
        if mixer.dtype is None:
            return super().autocast()  # type: ignore[misc, no-any-return]
        return _within(super().autocast(), self.device.type, mixer.dtype)  # type: ignore[misc, attr-defined]

    def backward(self, loss: torch.Tensor) -> None:
        scaler = self.addon_of(PrecisionMixerAddon).scaler  # type: ignore[attr-defined]
        if scaler is not None:
            loss = scaler.scale(loss)
        super().backward(loss)  # type: ignore[misc]

    def optimizer_step(self) -> None:
        mixer = self.addon_of(PrecisionMixerAddon)  # type: ignore[attr-defined]
        if mixer.scaler is None:
            super().optimizer_step()  # type: ignore[misc]
            return
        # GradScaler.step calls optimizer.step() itself, unless it found Inf/NaN gradients.
        mixer.scaler.step(self.optimizer)  # type: ignore[attr-defined]
        mixer.scaler.update()
        mixer._unscaled = False


class PrecisionMixerAddon(AddOn):
    """Mixed-precision training: autocast with the named dtype, loss scaling for fp16.

    Parameters
    ----------
    precision : str or sequence of str
        ``"auto"`` (default: bf16 on CUDA devices that support it, else fp16; fp32 on a CPU),
        ``"fp32"``, ``"fp16"``, ``"bf16"``, or a priority list (the first one the device
        supports is used, e.g. ``["bf16", "fp16", "fp32"]``).
    init_scale : float
        fp16 only: the ``GradScaler``'s initial loss scale.
    growth_interval : int
        fp16 only: steps without Inf/NaN gradients before the scale doubles.

    Attributes
    ----------
    resolved : str
        The precision in use (``"fp32"``, ``"fp16"`` or ``"bf16"``), known after construction.
    dtype : torch.dtype or None
        The autocast dtype (None for fp32).
    scaler : torch.amp.GradScaler or None
        The loss scaler (fp16 only); its state is in checkpoints.

    Examples
    --------
    >>> Trainer.add_on(PrecisionMixerAddon(precision="bf16"))  # doctest: +SKIP
    >>> MyTrainer.add_on("precision_mixer")(model, optimizer=opt, precision=["bf16", "fp16", "fp32"])  # doctest: +SKIP
    """

    name = "precision_mixer"
    order = -10  # unscale early in BEFORE_OPTIMIZER_STEP, before observers read gradients
    trainer_mixin = _MixedPrecisionStrategy

    def __init__(
        self,
        *,
        precision: str | Sequence[str] = "auto",
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
    ) -> None:
        choices = [precision] if isinstance(precision, str) else list(precision)
        for choice in choices:
            _canonical(choice)  # fail at construction on a misspelt name
        if not choices:
            raise ValueError("precision is an empty list. To fix, name at least one, e.g. ['bf16', 'fp32'].")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval must be an integer >= 1, got {growth_interval!r}")
        self.precision = precision
        self.init_scale = float(init_scale)
        self.growth_interval = growth_interval
        self.resolved = "fp32"
        self.dtype: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self._unscaled = False  # unscale_ done for a step that has not reached scaler.update yet

    def setup(self, trainer: Any) -> None:
        self.resolved = resolve_precision(self.precision, trainer.device)
        self.dtype = _DTYPES.get(self.resolved)
        if self.resolved == "fp16":
            if len(getattr(trainer, "optimizers", ())) > 1:
                raise TrainerConfigError(
                    f"fp16 loss scaling with several optimizers ({sorted(trainer.optimizers)}) has not been run, so it "
                    "is refused. To fix, use precision='bf16' (no loss scaling), or one optimizer."
                )
            self.scaler = torch.amp.GradScaler(
                trainer.device.type, init_scale=self.init_scale, growth_interval=self.growth_interval
            )

    def idle_events(self) -> frozenset[Event]:
        # Without a loss scaler there is nothing to unscale or settle: no per-step hooks.
        if self.scaler is None:
            return frozenset({Event.BEFORE_OPTIMIZER_STEP, Event.TRAIN_BATCH_END, Event.EPOCH_END})
        return frozenset()

    def idle_overrides(self) -> frozenset[str]:
        # fp32 changes nothing; bf16 only autocasts (no loss scaling, a plain optimizer step).
        if self.dtype is None:
            return frozenset({"autocast", "backward", "optimizer_step"})
        if self.scaler is None:
            return frozenset({"backward", "optimizer_step"})
        return frozenset()

    # -- hooks ------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Any) -> None:
        if self.scaler is None:
            return
        self._settle()
        self.scaler.unscale_(trainer.optimizer)
        self._unscaled = True

    def on_train_batch_end(self, trainer: Any) -> None:
        self._settle()

    def on_epoch_end(self, trainer: Any) -> None:
        self._settle()

    def _settle(self) -> None:
        """Close a step that another add-on skipped (``SkipStep``) after the unscale.

        ``GradScaler`` refuses a second ``unscale_`` before ``update``; ``update`` also lowers
        the scale when the skipped step had Inf/NaN gradients, as a scaler-skipped step would.
        """
        if self._unscaled and self.scaler is not None:
            self.scaler.update()
            self._unscaled = False

    # -- state ------------------------------------------------------------------------
    def loss_scale(self) -> float:
        """The current loss scale (1.0 without fp16); reads the device, so not per step."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"precision": self.resolved, "scaler": dict(self.scaler.state_dict()) if self.scaler else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scaler_state = state.get("scaler") or {}
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(dict(scaler_state))
