"""Step metrics accumulated on the device, converted to Python numbers only when flushed.

Per step, :meth:`MetricAccumulator.add` keeps a detached reference to each scalar the step
returned: no arithmetic, no transfer, no host-device synchronisation. A flush (at log
intervals and at epoch end) stacks each metric's pending values and reads them with one
``tolist()`` per metric. Epoch means are weighted by batch size and summed in float64
on the host, so they do not drift however long the epoch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping

import torch

__all__ = ["MetricAccumulator", "Flushed"]


@dataclass(frozen=True)
class Flushed:
    """What one flush produced: per-step values and their batch-size-weighted means."""

    steps: tuple[int, ...]
    values: Mapping[str, tuple[float, ...]]
    means: Mapping[str, float]

    def first_nonfinite(self, key: str) -> tuple[int, float] | None:
        """(step, value) of the first non-finite ``key`` value in this flush, if any."""
        for step, value in zip(self.steps, self.values.get(key, ())):
            if not math.isfinite(value):
                return step, value
        return None


class MetricAccumulator:
    """Collects one phase's step outputs (``train``, ``valid`` or ``test``).

    Scalars (0-dim or one-element tensors, Python numbers) are metrics: averaged, logged
    and kept per step in :attr:`history`. Larger tensors (model outputs) are kept, detached,
    in :attr:`outputs` until the next :meth:`reset`, for zae-engine code that reads
    ``trainer.log_test["output"]``.
    """

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.history: dict[str, list[Any]] = defaultdict(list)  # per-step floats, this epoch
        self.outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._pending: dict[str, list[Any]] = defaultdict(list)
        self._pending_sizes: dict[str, list[int]] = defaultdict(list)
        self._pending_steps: list[int] = []
        self._sums: dict[str, float] = defaultdict(float)
        self._weights: dict[str, float] = defaultdict(float)

    # -- per step (hot path) ----------------------------------------------------------
    def add(self, outputs: Mapping[str, Any], batch_size: int, step: int) -> None:
        """Record one step's outputs. Never synchronises with the device."""
        self._pending_steps.append(step)
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor):
                if value.numel() == 1:
                    self._pending[key].append(value.detach())
                    self._pending_sizes[key].append(batch_size)
                else:
                    self.outputs[key].append(value.detach())
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self._pending[key].append(float(value))
                self._pending_sizes[key].append(batch_size)

    def add_value(self, key: str, value: Any, weight: int = 1) -> None:
        """Record one extra value (a grad norm, say) outside a step's outputs; no sync either."""
        self._pending[key].append(value.detach() if isinstance(value, torch.Tensor) else float(value))
        self._pending_sizes[key].append(weight)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending_steps)

    # -- at log points and epoch end ---------------------------------------------------
    def flush(self) -> Flushed:
        """Convert pending values to floats, fold them into the epoch sums, and clear them."""
        steps = tuple(self._pending_steps)
        values: dict[str, tuple[float, ...]] = {}
        means: dict[str, float] = {}
        for key, pending in self._pending.items():
            if not pending:
                continue
            floats = _to_floats(pending)
            sizes = self._pending_sizes[key]
            weighted = math.fsum(v * n for v, n in zip(floats, sizes))
            weight = float(sum(sizes))
            self._sums[key] += weighted
            self._weights[key] += weight
            self.history[key].extend(floats)
            values[key] = tuple(floats)
            means[key] = weighted / weight if weight else math.nan
        self._pending.clear()
        self._pending_sizes.clear()
        self._pending_steps.clear()
        return Flushed(steps, values, means)

    def sums(self) -> dict[str, tuple[float, float]]:
        """Per metric: (batch-size-weighted sum, total weight) for this epoch so far."""
        return {k: (self._sums[k], self._weights[k]) for k in self._sums}

    def state_dict(self) -> dict[str, Any]:
        """This epoch's sums, per-step history and not-yet-flushed values, as plain floats.

        Checkpoints carry it so that a run resumed mid-epoch reports the same epoch means as
        one that never stopped. Pending values are read (one transfer per metric) but not
        folded in, so the accumulator itself is unchanged. Model outputs are not saved.
        """
        return {
            "sums": dict(self._sums),
            "weights": dict(self._weights),
            "history": {k: list(v) for k, v in self.history.items()},
            "pending": {k: _to_floats(v) for k, v in self._pending.items() if v},
            "pending_sizes": {k: list(v) for k, v in self._pending_sizes.items() if v},
            "pending_steps": list(self._pending_steps),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (replacing the current contents)."""
        self.reset()
        self._sums.update({k: float(v) for k, v in state.get("sums", {}).items()})
        self._weights.update({k: float(v) for k, v in state.get("weights", {}).items()})
        for key, values in state.get("history", {}).items():
            self.history[key] = [float(v) for v in values]
        for key, values in state.get("pending", {}).items():
            self._pending[key] = [float(v) for v in values]
        for key, sizes in state.get("pending_sizes", {}).items():
            self._pending_sizes[key] = [int(n) for n in sizes]
        self._pending_steps.extend(int(s) for s in state.get("pending_steps", []))

    def reset(self) -> None:
        """Forget everything: called when an epoch begins."""
        self.history.clear()
        self.outputs.clear()
        self._pending.clear()
        self._pending_sizes.clear()
        self._pending_steps.clear()
        self._sums.clear()
        self._weights.clear()


def _to_floats(values: list[Any]) -> list[float]:
    """One device-to-host transfer for the tensors among ``values``."""
    tensors = [(i, v) for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    try:
        stacked = torch.stack([t for _, t in tensors]).reshape(-1).tolist()
    except RuntimeError:  # mixed shapes such as () and (1,): flatten each first
        stacked = torch.stack([t.reshape(()) for _, t in tensors]).tolist()
    out = [float(v) if not isinstance(v, torch.Tensor) else 0.0 for v in values]
    for (i, _), value in zip(tensors, stacked):
        out[i] = float(value)
    return out
