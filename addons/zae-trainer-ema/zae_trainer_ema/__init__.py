"""EMAAddon: keep an exponential moving average of the model's weights and buffers.

The averaged copy is PyTorch's own :class:`torch.optim.swa_utils.AveragedModel`, built with
``use_buffers=True`` (BatchNorm statistics are averaged too) and averaged with
:func:`torch.optim.swa_utils.get_ema_multi_avg_fn`: after every optimizer step each tensor
moves toward the live one, ``ema = decay * ema + (1 - decay) * live``, as fused
``torch._foreach_lerp_`` operations on the model's device. With ``warmup`` the decay ramps up
as ``min(decay, (1 + n) / (10 + n))`` so that early averages are not dominated by the random
initialisation.

Why the add-on calls the averaging function itself instead of
``AveragedModel.update_parameters``: that method tests its step counter ``n_averaged`` with
Python ``if`` statements on every call, which on a GPU is a host-device synchronisation per
step (and copies the counter to the device). The first update, which copies the weights, does
go through ``update_parameters``; afterwards the add-on groups the tensors by device and
dtype as ``update_parameters`` does, applies the same EMA function, and counts on the host.

With ``validate_with_ema=True`` validation runs on the averaged weights (swapped in at
``VALID_BEGIN``, swapped back at ``VALID_END``), which is usually where EMA helps.

Examples
--------
>>> from zae_trainer import Trainer
>>> EMATrainer = Trainer.add_on("ema")                      # by its registered name
>>> EMATrainer = Trainer.add_on(EMAAddon(decay=0.999))      # or configured
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from zae_trainer import AddOn

__all__ = ["EMAAddon"]
__version__ = "0.2.0"


class EMAAddon(AddOn):
    """Exponential moving average of weights and buffers (``AveragedModel``).

    Parameters
    ----------
    decay : float
        Weight of the past, in [0, 1). 0.999 averages over roughly the last 1000 steps.
    warmup : bool
        Ramp the decay up over the first steps.
    validate_with_ema : bool
        Run validation with the averaged weights and buffers.
    """

    order = 10  # after the core's step; before nothing in particular
    runs_after = ("PrecisionMixerAddon", "GradientClippingAddon")
    exports = ("ema_state_dict", "apply_ema", "ema_model")

    def __init__(self, *, decay: float = 0.999, warmup: bool = False, validate_with_ema: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}. To fix, use e.g. decay=0.999")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.validate_with_ema = bool(validate_with_ema)
        self.updates = 0  # optimizer steps averaged in, counted on the host
        self._averaged: AveragedModel | None = None
        self._backup: list[torch.Tensor] | None = None

    # -- helpers ------------------------------------------------------------------------------
    def ema_model(self) -> AveragedModel:
        """The ``AveragedModel`` holding the averages (``.module`` is a copy of the model)."""
        if self._averaged is None:
            model = self.trainer.raw_model
            averaged = AveragedModel(model, use_buffers=True)
            averaged.update_parameters(model)  # the library's first step: copy the weights
            self._averaged = averaged
        return self._averaged

    def current_decay(self) -> float:
        """The decay used for the next update (plain Python: ``updates`` is a host counter)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def _live(self) -> list[torch.Tensor]:
        model = self.trainer.raw_model
        return [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]

    def _averages(self) -> list[torch.Tensor]:
        module = self.ema_model().module
        return [t.detach() for t in itertools.chain(module.parameters(), module.buffers())]

    # -- hooks ------------------------------------------------------------------------------------
    def on_run_begin(self, trainer: Any) -> None:
        self.ema_model()

    def on_after_optimizer_step(self, trainer: Any) -> None:
        averaged = self.ema_model()
        average = get_ema_multi_avg_fn(self.current_decay())
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for ema, live in zip(self._averages(), self._live()):
            pair = groups.setdefault((ema.device, ema.dtype), ([], []))
            pair[0].append(ema)
            pair[1].append(live.to(ema.device))
        for emas, lives in groups.values():
            average(emas, lives, averaged.n_averaged)
        averaged.n_averaged += 1  # a CPU tensor: no device work
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
        """The model's ``state_dict`` with averaged parameters and buffers (copies)."""
        return {k: v.detach().clone() for k, v in self.ema_model().module.state_dict().items()}

    def apply_ema(self) -> None:
        """Copy the averaged weights and buffers into the model (e.g. before export or inference)."""
        with torch.no_grad():
            for live, ema in zip(self._live(), self._averages()):
                live.copy_(ema)

    def _swap_in(self) -> None:
        live = self._live()
        self._backup = [t.clone() for t in live]
        with torch.no_grad():
            for target, ema in zip(live, self._averages()):
                target.copy_(ema)

    def _swap_out(self) -> None:
        if self._backup is None:
            return
        with torch.no_grad():
            for target, saved in zip(self._live(), self._backup):
                target.copy_(saved)
        self._backup = None

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        averaged = self._averaged
        return {
            "updates": self.updates,
            "averaged": {k: v for k, v in averaged.state_dict().items()} if averaged is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        if "shadow" in state:  # written by version 0.1 (parameters only, by position)
            self._load_v1_shadow(state["shadow"])
            return
        saved = state.get("averaged") or {}
        if not saved:
            self._averaged = None
            return
        averaged = self.ema_model()
        try:
            averaged.load_state_dict(saved)
        except RuntimeError as exc:
            raise ValueError(
                f"the EMA state does not fit this model ({exc}); it comes from a different model. To fix, "
                "resume with the model the checkpoint was trained with."
            ) from exc

    def _load_v1_shadow(self, saved: dict[str, torch.Tensor]) -> None:
        params = [p for p in self.trainer.raw_model.parameters() if p.dtype.is_floating_point]
        if saved and len(saved) != len(params):
            raise ValueError(
                f"EMA state holds {len(saved)} tensors but the model has {len(params)} floating-point parameters; "
                "it comes from a different model"
            )
        self._averaged = None
        if not saved:
            return
        averaged = self.ema_model()
        floating = [p for p in averaged.module.parameters() if p.dtype.is_floating_point]
        with torch.no_grad():
            for i, target in enumerate(floating):
                target.copy_(saved[str(i)])
        averaged.n_averaged.fill_(max(1, self.updates + 1))
