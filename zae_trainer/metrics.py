"""Step metrics accumulated without stalls, in memory that does not grow over an epoch.

What a step's outputs become
----------------------------
``train_step`` / ``test_step`` return a dict. Per step, :meth:`MetricAccumulator.add` sorts
its values:

* **Scalars** (0-dim or one-element tensors, Python numbers) are metrics. A detached
  reference is kept until the next flush: no arithmetic, no transfer, no host-device
  synchronisation. A flush (at log intervals and at epoch end) reads each metric's pending
  values with one ``tolist()`` and folds them into running, batch-size-weighted sums, kept
  in float64 on the host, so epoch means do not drift however long the epoch. Should the
  log interval be very long, pending values are read every :data:`MAX_PENDING_STEPS` steps
  anyway, so the device never holds more than that many per metric.
* **torchmetrics** ``Metric`` objects (``{"f1": self.f1}`` after ``self.f1.update(...)``) are
  remembered by reference, once: the metric keeps its own state on the device. When the
  phase ends :meth:`MetricAccumulator.compute_metrics` calls ``compute()`` (which
  synchronises the metric across processes itself under DDP) and ``reset()``. This is how
  to get metrics that are not means of batch values (F1, AUROC, precision at k). Create
  metrics with ``validate_args=False``: the input checks read values on the host.
* **Anything else** (logits, predictions, strings) is not kept. A model's per-batch outputs
  for the whole epoch would grow device memory with every step; use
  :meth:`~zae_trainer.Trainer.inference` to collect predictions, or a torchmetrics
  ``Metric`` to reduce them. (The zae-engine layer, :mod:`zae_trainer.compat`, keeps its
  per-batch ``log_train`` / ``log_test`` lists itself, for code that reads them.)

So the memory an epoch holds does not depend on its length: the running sums, at most
:data:`MAX_PENDING_STEPS` pending scalars per metric, and one reference per ``Metric``.
"""

from __future__ import annotations

import math
import operator
import sys
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping

import torch

__all__ = ["MetricAccumulator", "Flushed", "MAX_PENDING_STEPS", "is_torchmetric"]

#: Steps after which pending scalar tensors are read to the host even between log points
#: (one transfer per metric), so their number on the device stays bounded.
MAX_PENDING_STEPS = 256


@dataclass(frozen=True)
class Flushed:
    """What one flush produced: per-step values and their batch-size-weighted means."""

    steps: tuple[int, ...]
    values: Mapping[str, tuple[float, ...]]
    means: Mapping[str, float]

    def first_nonfinite(self, key: str) -> tuple[int, float] | None:
        """(step, value) of the first non-finite ``key`` value in this flush, if any."""
        values = self.values.get(key, ())
        if math.isfinite(sum(values)):  # NaN or Inf anywhere makes the sum non-finite
            return None
        for step, value in zip(self.steps, values):
            if not math.isfinite(value):
                return step, value
        return None


def is_torchmetric(value: Any) -> bool:
    """Whether ``value`` is a torchmetrics ``Metric`` (or ``MetricCollection``).

    torchmetrics is an optional dependency: when it was never imported, nothing can be one,
    so this costs a dictionary lookup and never imports it.
    """
    module = sys.modules.get("torchmetrics")
    if module is None:
        return False
    return isinstance(value, (module.Metric, module.MetricCollection))


# Which accumulator tracks each Metric object at the moment, to refuse one object shared by
# two phases (training and validation would mix their predictions). Weak on both sides:
# it keeps neither the metrics nor the accumulators alive.
_metric_owner: "weakref.WeakKeyDictionary[Any, weakref.ReferenceType[MetricAccumulator]]" = (
    weakref.WeakKeyDictionary()
)


class MetricAccumulator:
    """Collects one phase's step outputs (``train``, ``valid`` or ``test``).

    Parameters
    ----------
    phase : str
        The phase name, used in metric names (``train/loss``) and error messages.
    """

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self._pending: dict[str, list[Any]] = defaultdict(list)
        self._pending_sizes: dict[str, list[int]] = defaultdict(list)
        self._pending_steps: list[int] = []
        self._sums: dict[str, float] = defaultdict(float)
        self._weights: dict[str, float] = defaultdict(float)
        self._metrics: dict[str, Any] = {}  # key -> torchmetrics Metric, computed at epoch end
        self._warned: set[str] = set()

    # -- per step (hot path) ----------------------------------------------------------
    def add(self, outputs: Mapping[str, Any], batch_size: int, step: int) -> None:
        """Record one step's outputs. Never synchronises with the device."""
        self._pending_steps.append(step)
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor):
                if value.numel() == 1:
                    # A reference without the graph. For a plain tensor ``.data`` gives the same
                    # values as ``detach()`` without a trip through the dispatcher (~2,400
                    # instructions a step); it is only ever read, never written through.
                    self._pending[key].append(value.data if type(value) is torch.Tensor else value.detach())
                    self._pending_sizes[key].append(batch_size)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self._pending[key].append(float(value))
                self._pending_sizes[key].append(batch_size)
            elif self._metrics.get(key) is not value and is_torchmetric(value):
                self._track_metric(key, value)
        if len(self._pending_steps) % MAX_PENDING_STEPS == 0:
            self._read_pending()

    def add_value(self, key: str, value: Any, weight: int = 1) -> None:
        """Record one extra value (a grad norm, say) outside a step's outputs; no sync either."""
        if isinstance(value, torch.Tensor):
            if value.requires_grad:  # a tensor without grad has no graph to let go of: no detach (~4k instructions)
                value = value.detach()
        else:
            value = float(value)
        self._pending[key].append(value)
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
            weighted = math.fsum(map(operator.mul, floats, sizes))
            weight = float(sum(sizes))
            self._sums[key] += weighted
            self._weights[key] += weight
            values[key] = tuple(floats)
            means[key] = weighted / weight if weight else math.nan
        self._pending.clear()
        self._pending_sizes.clear()
        self._pending_steps.clear()
        return Flushed(steps, values, means)

    def sums(self) -> dict[str, tuple[float, float]]:
        """Per metric: (batch-size-weighted sum, total weight) for this epoch so far."""
        return {k: (self._sums[k], self._weights[k]) for k in self._sums}

    def compute_metrics(self) -> dict[str, float]:
        """Compute, then reset, the torchmetrics ``Metric`` objects the steps returned.

        Called when the phase's batches are done, on every process: under DDP each
        ``compute()`` is a collective (torchmetrics gathers its state from all ranks when a
        process group exists), so every rank holds the same, global value, and the core's
        mean over ranks leaves it unchanged. A scalar result is
        named after its key, a 1-D result ``<key>/<index>``, a dict (``MetricCollection``)
        ``<key>/<name>``. Other shapes are skipped with a warning.
        """
        results: dict[str, float] = {}
        for key, metric in self._metrics.items():
            _flatten(key, metric.compute(), results, self._warn_once)
            metric.reset()
        self._untrack_metrics()
        return results

    def state_dict(self) -> dict[str, Any]:
        """This epoch's sums and not-yet-flushed values, as plain floats.

        Checkpoints carry it so that a run resumed mid-epoch reports the same epoch means as
        one that never stopped. Pending values are read (one transfer per metric) but not
        folded in, so the accumulator itself is unchanged. Model outputs and torchmetrics
        states are not saved: after a mid-epoch resume a ``Metric`` covers the batches since
        the resume.
        """
        state: dict[str, Any] = {}
        if self._sums:
            state["sums"], state["weights"] = dict(self._sums), dict(self._weights)
        if self._pending_steps:
            state["pending"] = {k: _to_floats(v) for k, v in self._pending.items() if v}
            state["pending_sizes"] = {k: list(v) for k, v in self._pending_sizes.items() if v}
            state["pending_steps"] = list(self._pending_steps)
        return state  # empty parts are left out: {} is a phase with nothing recorded

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (replacing the current contents)."""
        self.reset()
        self._sums.update({k: float(v) for k, v in state.get("sums", {}).items()})
        self._weights.update({k: float(v) for k, v in state.get("weights", {}).items()})
        for key, values in state.get("pending", {}).items():
            self._pending[key] = [float(v) for v in values]
        for key, sizes in state.get("pending_sizes", {}).items():
            self._pending_sizes[key] = [int(n) for n in sizes]
        self._pending_steps.extend(int(s) for s in state.get("pending_steps", []))

    def reset(self) -> None:
        """Forget everything (torchmetrics states included): called when an epoch begins."""
        self._pending.clear()
        self._pending_sizes.clear()
        self._pending_steps.clear()
        self._sums.clear()
        self._weights.clear()
        for metric in self._metrics.values():
            metric.reset()
        self._untrack_metrics()

    # -- internals ----------------------------------------------------------------------
    def _read_pending(self) -> None:
        """Move pending tensors' values to the host (one transfer per metric), keep them pending."""
        for key, pending in self._pending.items():
            if pending and any(isinstance(v, torch.Tensor) for v in pending):
                self._pending[key] = _to_floats(pending)

    def _track_metric(self, key: str, metric: Any) -> None:
        if key in self._metrics:
            raise ValueError(
                f"{self.phase} step returned a different torchmetrics object under {key!r} than earlier in "
                "this epoch. To fix, create each Metric once (in __init__, or as a model attribute), update "
                "it in the step, and return that same object every step."
            )
        owner_ref = _metric_owner.get(metric)
        owner = owner_ref() if owner_ref is not None else None
        if owner is not None and owner is not self and any(m is metric for m in owner._metrics.values()):
            raise ValueError(
                f"the torchmetrics object returned under {key!r} in the {self.phase} phase is also in use in "
                f"the {owner.phase} phase, so both would compute over each other's batches. To fix, give each "
                f"phase its own object, e.g. self.train_f1 and self.valid_f1 = metric.clone()."
            )
        self._metrics[key] = metric
        _metric_owner[metric] = weakref.ref(self)

    def _untrack_metrics(self) -> None:
        for metric in self._metrics.values():
            owner_ref = _metric_owner.get(metric)
            if owner_ref is not None and owner_ref() is self:
                del _metric_owner[metric]
        self._metrics.clear()

    def _warn_once(self, name: str, message: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def _flatten(name: str, value: Any, out: dict[str, float], warn: Any) -> None:
    """Plain floats from a ``compute()`` result (tensor, number or dict of those)."""
    if isinstance(value, Mapping):
        for sub, item in value.items():
            _flatten(f"{name}/{sub}", item, out, warn)
    elif isinstance(value, torch.Tensor) and value.numel() == 1:
        out[name] = float(value)
    elif isinstance(value, torch.Tensor) and value.dim() == 1:
        out.update({f"{name}/{i}": v for i, v in enumerate(value.tolist())})
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[name] = float(value)
    else:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        warn(
            name,
            f"torchmetrics result {name!r} has shape {shape}, which is not a metric value (a number, a "
            "1-D tensor or a dict of those); it is not logged. To log it, reduce it in the metric "
            "(e.g. average='macro') or compute it yourself at epoch end.",
        )


def _to_floats(values: list[Any]) -> list[float]:
    """One device-to-host transfer for the tensors among ``values``."""
    try:  # the usual case at a log point: one scalar tensor per step, all of one shape
        together = torch.stack(values)
    except (TypeError, RuntimeError):  # numbers among them (record_metric, a resumed epoch), or mixed shapes
        pass
    else:
        # 0-dim values stack to 1-D already; a reshape would cost a view (~13,000 instructions)
        read = (together if together.dim() == 1 else together.reshape(-1)).tolist()
        if len(read) == len(values):
            return read if together.is_floating_point() else [float(v) for v in read]
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
