"""GradientClippingAddon: clip gradients by total norm or by value, before the optimizer step.

It acts in ``BEFORE_OPTIMIZER_STEP``, after mixed precision has unscaled the gradients
(``runs_after = ("precision_mixer",)``), so ``max_norm`` is in the units of the true
gradients whatever the precision. The total norm before clipping is recorded with
``trainer.record_metric`` as ``train/grad_norm``: it stays a device tensor until the next log
point, so clipping adds no host-device synchronisation.

Per step it costs what a hand-written loop pays for the same work: one
``clip_grad_norm_`` call (fused multi-tensor kernels where PyTorch has them) over a parameter
list gathered once per run, and keeping a reference to the norm. The latest norm is also
kept as ``last_norm`` (``(step, tensor)``), so the non-finite guard checks it instead of
computing the norm a second time.

With several optimizers (:mod:`zae_trainer.optimizers`) each optimizer's step clips that
optimizer's parameters only, and records ``train/grad_norm/<optimizer name>``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..addon import AddOn

__all__ = ["GradientClippingAddon"]


class GradientClippingAddon(AddOn):
    """Gradient clipping by total norm (``max_norm``) or by value (``clip_value``).

    Parameters
    ----------
    max_norm : float or None
        Scale all gradients down together so that their total ``norm_type``-norm is at most
        this (``torch.nn.utils.clip_grad_norm_``).
    clip_value : float or None
        Clamp every gradient element to ``[-clip_value, clip_value]``
        (``torch.nn.utils.clip_grad_value_``). Exactly one of ``max_norm`` / ``clip_value``.
    norm_type : float or "inf"
        The p of the p-norm (default 2); ``"inf"`` for the largest absolute element.
    error_if_nonfinite : bool
        Raise when the total norm is NaN/Inf (``clip_grad_norm_``'s option). This reads the
        norm on the host, i.e. one synchronisation per step; off by default.
    foreach : bool or None
        Use the fused multi-tensor kernels (None: where PyTorch supports them). None is
        resolved once per run, the way ``clip_grad_norm_`` would resolve it every step: True
        when every parameter is a plain ``nn.Parameter`` on a device with those kernels
        (sparing ``clip_grad_norm_`` its per-step check of every gradient, ~23,000
        instructions a step on a three-layer MLP); otherwise left to PyTorch per step.
    record_norm : bool
        Record the total norm before clipping as the metric ``grad_norm``. With
        ``clip_value`` this costs one extra pass over the gradients.

    Examples
    --------
    >>> MyTrainer.add_on(GradientClippingAddon(max_norm=1.0))  # doctest: +SKIP
    >>> MyTrainer.add_on("gradient_clipping")(model, optimizer=opt, clip_value=0.5)  # doctest: +SKIP
    """

    name = "gradient_clipping"
    runs_after = ("precision_mixer",)  # clip unscaled gradients

    def __init__(
        self,
        *,
        max_norm: float | None = None,
        clip_value: float | None = None,
        norm_type: float | str = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
        record_norm: bool = True,
    ) -> None:
        if (max_norm is None) == (clip_value is None):
            raise ValueError(
                "give exactly one of max_norm (clip the total norm) or clip_value (clamp each element), got "
                f"max_norm={max_norm!r}, clip_value={clip_value!r}. To fix, e.g. GradientClippingAddon(max_norm=1.0)."
            )
        for label, value in (("max_norm", max_norm), ("clip_value", clip_value)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{label} must be a finite number > 0, got {value!r}")
        self.max_norm = None if max_norm is None else float(max_norm)
        self.clip_value = None if clip_value is None else float(clip_value)
        self.norm_type = _norm_type(norm_type)
        self.error_if_nonfinite = bool(error_if_nonfinite)
        self.foreach = foreach
        self.record_norm = bool(record_norm)
        self.last_norm: tuple[int, torch.Tensor] | None = None  # (1-based step, total norm before clipping)
        self._params: list[torch.nn.Parameter] = []
        self._foreach: bool | None = foreach  # ``foreach`` as resolved for this run
        self._by_optimizer: dict[str, list[torch.Tensor]] | None = None  # several optimizers: each one's params

    def on_run_begin(self, trainer: Any) -> None:
        # Gathered once per run, after any wrapping (DDP): clip_grad_norm_ skips parameters
        # without gradients itself, so the list need not change from step to step.
        self._params = list(trainer.model.parameters())
        self._foreach = self.foreach if self.foreach is not None else _foreach_supported(self._params)
        optimizers = trainer.optimizers
        # Several optimizers: each step clips the parameters of the optimizer stepping (trainer.stepping).
        self._by_optimizer = None if len(optimizers) < 2 else {
            name: [p for group in opt.param_groups for p in group["params"]] for name, opt in optimizers.items()
        }

    def on_before_optimizer_step(self, trainer: Any) -> None:
        by_optimizer = self._by_optimizer
        params = self._params if by_optimizer is None else by_optimizer[trainer.stepping]
        if self.max_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(
                params, self.max_norm, self.norm_type, self.error_if_nonfinite, self._foreach
            )
        else:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                return
            total = None
            if self.record_norm or self.error_if_nonfinite:
                total = torch.nn.utils.get_total_norm(grads, self.norm_type, self.error_if_nonfinite, self._foreach)
            assert self.clip_value is not None
            torch.nn.utils.clip_grad_value_(params, self.clip_value, self._foreach)
        if total is not None:
            # FSDP: a DTensor holding the global norm; keep a plain tensor (the type test first:
            # hasattr on a plain tensor fails through an exception, ~1,000 instructions a step)
            if type(total) is not torch.Tensor and hasattr(total, "full_tensor"):
                total = total.full_tensor()
            self.last_norm = (trainer.progress_checker.step + 1, total)
            if self.record_norm:  # computed under no_grad: no detach needed
                trainer.record_metric("grad_norm" if by_optimizer is None else f"grad_norm/{trainer.stepping}", total)

    @property
    def computes_norm(self) -> bool:
        """Whether every clipped step yields the total norm (``last_norm``)."""
        return self.max_norm is not None or self.record_norm or self.error_if_nonfinite


def _foreach_supported(params: list[torch.nn.Parameter]) -> bool | None:
    """True where ``clip_grad_norm_(foreach=None)`` would take the fused kernels on every
    step: all parameters plain ``nn.Parameter`` (so their gradients are plain tensors; a
    DTensor or other subclass is left to PyTorch) on devices that have them. None otherwise,
    and where this PyTorch does not expose its check: PyTorch then decides per step."""
    if not params or any(type(p) is not torch.nn.Parameter for p in params):
        return None
    try:  # a private helper (there since torch 2.0): if it moves or changes, PyTorch decides per step
        from torch.utils._foreach_utils import _device_has_foreach_support

        supported = all(_device_has_foreach_support(d) for d in {p.device for p in params})
    except (ImportError, AttributeError, TypeError):  # pragma: no cover
        return None
    return True if supported else None


def _norm_type(value: float | str) -> float:
    if isinstance(value, str):
        if value.strip().lower() in ("inf", "infinity"):
            return math.inf
        raise ValueError(f"norm_type must be a number or 'inf', got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"norm_type must be a number > 0 or 'inf', got {value!r}")
    return float(value)
