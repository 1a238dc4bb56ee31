"""EMAAddon: keep an exponential moving average of the model's weights.

After every optimizer step, each floating-point parameter's shadow copy moves toward it:
``shadow = decay * shadow + (1 - decay) * param`` (with ``warmup``, the decay ramps up as
``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by the random
initialisation). The shadow lives on the model's device and is updated with fused
``torch._foreach`` operations: no host synchronisation.

With ``validate_with_ema=True`` validation runs on the averaged weights (swapped in at
``VALID_BEGIN``, swapped back at ``VALID_END``), which is usually where EMA helps.

Examples
--------
>>> from zae_trainer import Trainer
>>> EMATrainer = Trainer.add_on("ema")                      # by its registered name
>>> EMATrainer = Trainer.add_on(EMAAddon(decay=0.999))      # or configured
"""

from __future__ import annotations

from typing import Any

import torch

from zae_trainer import AddOn

__all__ = ["EMAAddon"]
__version__ = "0.1.0"


class EMAAddon(AddOn):
    """Exponential moving average of weights.

    Parameters
    ----------
    decay : float
        Weight of the past, in [0, 1). 0.999 averages over roughly the last 1000 steps.
    warmup : bool
        Ramp the decay up over the first steps.
    validate_with_ema : bool
        Run validation with the averaged weights.
    """

    order = 10  # after the core's step; before nothing in particular
    runs_after = ("PrecisionMixerAddon", "GradientClippingAddon")
    exports = ("ema_state_dict", "apply_ema")

    def __init__(self, *, decay: float = 0.999, warmup: bool = False, validate_with_ema: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}. To fix, use e.g. decay=0.999")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.validate_with_ema = bool(validate_with_ema)
        self.updates = 0
        self._shadow: list[torch.Tensor] | None = None
        self._backup: list[torch.Tensor] | None = None

    # -- helpers ------------------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.trainer.raw_model.parameters() if p.dtype.is_floating_point]

    def _ensure_shadow(self) -> list[torch.Tensor]:
        if self._shadow is None:
            self._shadow = [p.detach().clone() for p in self._params()]
        return self._shadow

    def current_decay(self) -> float:
        """The decay used for the next update (plain Python: ``updates`` is a host counter)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    # -- hooks ------------------------------------------------------------------------------------
    def on_run_begin(self, trainer: Any) -> None:
        self._ensure_shadow()

    def on_after_optimizer_step(self, trainer: Any) -> None:
        shadow = self._ensure_shadow()
        params = [p.detach() for p in self._params()]
        torch._foreach_lerp_(shadow, params, 1.0 - self.current_decay())
        self.updates += 1

    def on_valid_begin(self, trainer: Any) -> None:
        if self.validate_with_ema:
            self._swap_in()

    def on_valid_end(self, trainer: Any) -> None:
        if self.validate_with_ema:
            self._swap_out()

    def on_exception(self, trainer: Any, exception: BaseException) -> None:
        if self._backup is not None:  # never leave averaged weights in the model by accident
            self._swap_out()

    # -- exported ---------------------------------------------------------------------------------
    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` with averaged parameters (buffers as they are now)."""
        model = self.trainer.raw_model
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        names = [n for n, p in model.named_parameters() if p.dtype.is_floating_point]
        for name, value in zip(names, self._ensure_shadow()):
            state[name] = value.detach().clone()
        return state

    def apply_ema(self) -> None:
        """Copy the averaged weights into the model (e.g. before export or inference)."""
        with torch.no_grad():
            torch._foreach_copy_(self._params(), self._ensure_shadow())

    def _swap_in(self) -> None:
        params = self._params()
        self._backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, self._ensure_shadow())

    def _swap_out(self) -> None:
        if self._backup is None:
            return
        with torch.no_grad():
            torch._foreach_copy_(self._params(), self._backup)
        self._backup = None

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        shadow = self._shadow if self._shadow is not None else []
        return {"updates": self.updates, "shadow": {str(i): t for i, t in enumerate(shadow)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        saved = state["shadow"]
        params = self._params()
        if saved and len(saved) != len(params):
            raise ValueError(
                f"EMA state holds {len(saved)} tensors but the model has {len(params)} floating-point parameters; "
                "it comes from a different model"
            )
        self._shadow = [saved[str(i)].to(p.device, p.dtype).clone() for i, p in enumerate(params)] if saved else None
