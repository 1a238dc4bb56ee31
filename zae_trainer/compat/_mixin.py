"""zae-engine's public trainer surface, kept so its users change only the import.

Each method keeps zae-engine's name and signature; where zae-engine misbehaved, the fix is
noted in the docstring (``apply_weights`` raises instead of printing, ``check_better`` keeps
a copy of the best weights instead of references that follow training).
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch

from ..transfer import move_to_device

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..metrics import MetricAccumulator

__all__ = ["ZaeEngineCompat"]


class ZaeEngineCompat:
    """Mixed into :class:`~zae_trainer.Trainer`; every method here works on a trainer."""

    if TYPE_CHECKING:  # what the methods below use from Trainer
        device: torch.device
        non_blocking: bool
        mode: str
        monitor_mode: str
        loss_buffer: float
        weight_buffer: defaultdict[str, list[Any]]
        optimizer: torch.optim.Optimizer | None
        loader: Any
        valid_loader: Any
        batch_size: int | None
        valid_batch_size: int | None
        loss_history_train: list[float]
        loss_history_test: list[float]
        _accumulators: dict[str, MetricAccumulator]

        @property
        def raw_model(self) -> nn.Module: ...

        @property
        def log_train(self) -> dict[str, list[Any]]: ...

        @property
        def log_test(self) -> dict[str, list[Any]]: ...

        @staticmethod
        def _check_mode(mode: str) -> str: ...

    def _to_device(self, *args: Any, **kwargs: Any) -> Any:
        """Move arguments to the trainer's device (one → it, several → tuple, keywords → dict)."""
        if kwargs and not args:
            return {k: move_to_device(v, self.device, self.non_blocking) for k, v in kwargs.items()}
        if len(args) == 1:
            arg = args[0]
            if isinstance(arg, torch.nn.Module):
                return arg.to(self.device)
            return move_to_device(arg, self.device, self.non_blocking)
        return tuple(move_to_device(a, self.device, self.non_blocking) for a in args)

    def _to_cpu(self, *args: Any) -> Any:
        """Detach tensors and move them to the CPU (one → it, several → tuple)."""
        if len(args) == 1:
            arg = args[0]
            return arg.detach().cpu() if isinstance(arg, torch.Tensor) else arg
        return tuple(self._to_cpu(a) for a in args)

    def _check_batch_size(self) -> None:
        self.batch_size = getattr(self.loader, "batch_size", None) if self.loader is not None else 0
        self.valid_batch_size = (
            getattr(self.valid_loader, "batch_size", None) if self.valid_loader is not None else 0
        )

    def toggle(self, mode: str | None = None) -> None:
        """Switch between ``"train"`` and ``"test"``, or to ``mode`` when given."""
        if mode is None:
            mode = "test" if self.mode == "train" else "train"
        self.mode = self._check_mode(mode)

    def check_better(self, cur_epoch: int, cur_loss: float) -> bool:
        """Keep a copy of the weights if ``cur_loss`` beats the best so far.

        Unlike zae-engine, the buffer holds a CPU copy, so the "best" weights do not follow
        training afterwards. Lower is better unless ``monitor_mode="max"``.
        """
        better = cur_loss < self.loss_buffer if self.monitor_mode == "min" else cur_loss > self.loss_buffer
        if not better:
            return False
        weights = {k: v.detach().to("cpu", copy=True) for k, v in self.raw_model.state_dict().items()}
        self.weight_buffer["epoch"].append(cur_epoch)
        self.weight_buffer["weight"].append(weights)
        if len(self.weight_buffer["weight"]) > 1:  # keep memory flat: only the latest best is useful
            self.weight_buffer["weight"][-2] = None
        self.loss_buffer = cur_loss
        return True

    def log_reset(self) -> None:
        """Clear the per-epoch logs (``log_train``, ``log_test``)."""
        for acc in self._accumulators.values():
            acc.reset()

    def get_loss_history(self, mode: str = "train") -> list[float]:
        """Every step's loss over the whole run, for ``"train"`` or ``"test"`` (validation)."""
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        return self.loss_history_train if mode == "train" else self.loss_history_test

    def print_log(self, cur_batch: int, num_batch: int) -> tuple[str, dict[str, Any]]:
        """zae-engine's one-line batch report: ``(text, print kwargs)``. Reads flushed values only."""
        log = self.log_train if self.mode == "train" else self.log_test
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0
        is_end = cur_batch == num_batch
        text = f"\r\t\tBatch: {cur_batch}/{num_batch}"
        for key, values in log.items():
            if "output" in key or not values:
                continue
            text += f"\t{key}: {sum(values) / len(values):.6f}"
        text += f"\tLR: {lr:.3e}"
        return text, {"end": "\n" if is_end else "", "file": None if is_end else sys.stderr}

    def save_model(self, filename: str | os.PathLike[str]) -> None:
        """Write the (unwrapped) model's ``state_dict`` to ``filename`` with ``torch.save``."""
        torch.save(self.raw_model.state_dict(), filename)

    def apply_weights(self, filename: str | os.PathLike[str] | None = None, strict: bool = True) -> None:
        """Load weights into the model: from ``filename``, or the best in-memory copy if ``None``.

        Raises ``FileNotFoundError`` / ``RuntimeError`` instead of printing and carrying on
        (zae-engine's behaviour), because silently training or serving the wrong weights
        loses work.
        """
        if filename is not None:
            path = os.fspath(filename)
            if not os.path.exists(path):
                folder = os.path.dirname(os.path.abspath(path))
                listing = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
                raise FileNotFoundError(
                    f"apply_weights: no file {path!r}. Files in {folder!r}: {listing[:20] or '(none)'}"
                )
            weights = torch.load(path, map_location="cpu", weights_only=True)
        else:
            buffered = [w for w in self.weight_buffer["weight"] if w is not None]
            if not buffered:
                raise RuntimeError(
                    "apply_weights(): no best weights in memory yet; they are recorded at the end of each "
                    "training epoch that improves the monitored loss. Pass a filename, or run() first."
                )
            weights = buffered[-1]
        self.raw_model.load_state_dict(weights, strict=strict)

    def _new_weight_buffer(self) -> defaultdict[str, list[Any]]:
        return defaultdict(list)
