"""EarlyStoppingAddon: stop training when the monitored metric stops improving (or is good enough).

It decides at ``EPOCH_END``, from ``trainer.epoch_metrics``, and stops through
``trainer.request_stop(reason)``: the run ends after this epoch's hooks, ``RUN_END`` fires,
and ``trainer.stop_reason`` / the run summary say why. The reason is also logged on the
``zae_trainer`` logger.

Ordering: its counters must be updated before the state manager writes the epoch's
checkpoint, so that a resumed run keeps its patience. ``EPOCH_END`` calls add-ons in reverse
declared order, so it declares ``runs_after = ("StateManagerAddon",)``: later in the declared
order, hence earlier on ``EPOCH_END``.

Under DDP, ``epoch_metrics`` are already all-reduced when ``EPOCH_END`` fires, so every rank
computes the same decision from the same numbers and all ranks stop after the same epoch,
without any extra communication.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any, Callable, Literal

from ..addon import AddOn
from ..errors import TrainerConfigError

__all__ = ["EarlyStoppingAddon"]

_log = logging.getLogger("zae_trainer")


class EarlyStoppingAddon(AddOn):
    """Stop when ``monitor`` has not improved for ``patience`` epochs, or crosses a threshold.

    Parameters
    ----------
    monitor : str or None
        Epoch metric to watch, e.g. ``"valid/acc"``. Default: the trainer's monitored metric
        (``monitor=`` of the trainer, else ``valid/loss`` when validating, else ``train/loss``).
        On an epoch without validation (``valid_every_n_epochs > 1``) a ``valid/*`` monitor is
        absent and the epoch is not counted.
    mode : {"min", "max"} or None
        Whether lower or higher is better. Default: the trainer's ``monitor_mode``.
    patience : int
        Epochs without improvement before stopping.
    min_delta : float
        The smallest change that counts as an improvement (>= 0).
    stopping_threshold : float or None
        Stop as soon as the metric is at least this good (e.g. accuracy >= 0.99).
    divergence_threshold : float or None
        Stop as soon as the metric is worse than this (e.g. a loss above 10): training diverged.
    check_finite : bool
        Stop when the metric is NaN or infinite.
    verbose : bool
        Log every epoch's decision, and the stop as a warning rather than at info level.

    Notes
    -----
    ``monitor`` and ``mode`` can only be given to a configured instance: as keywords of the
    trainer's constructor they are the trainer's own ``monitor=`` and ``mode=`` ("train" /
    "test"). With keywords, set the trainer's ``monitor=`` / ``monitor_mode=``, which this
    add-on follows by default (one monitored metric for checkpoints, early stopping and
    plateau schedulers).

    Attributes
    ----------
    best : float or None
        Best value seen. ``wait`` counts epochs since it; ``stopped_epoch`` is the epoch that
        requested the stop. All three are in checkpoints.

    Examples
    --------
    >>> MyTrainer.add_on(EarlyStoppingAddon(monitor="valid/acc", mode="max", patience=5))  # doctest: +SKIP
    >>> MyTrainer.add_on("early_stopping")(model, optimizer=opt, patience=3, min_delta=1e-4)  # doctest: +SKIP
    """

    name = "early_stopping"
    runs_after = ("StateManagerAddon",)  # reverse order on EPOCH_END: decide before the checkpoint

    def __init__(
        self,
        *,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        patience: int = 3,
        min_delta: float = 0.0,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
        verbose: bool = False,
    ) -> None:
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min', 'max' or None (the trainer's monitor_mode), got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
            raise ValueError(f"min_delta must be a number >= 0 (the direction comes from mode), got {min_delta!r}")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.check_finite = bool(check_finite)
        self.verbose = bool(verbose)
        self.best: float | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def setup(self, trainer: Any) -> None:
        mode = self.mode or trainer.monitor_mode
        low, high = self.stopping_threshold, self.divergence_threshold
        if low is not None and high is not None:
            good_side_ok = low < high if mode == "min" else low > high
            if not good_side_ok:
                raise TrainerConfigError(
                    f"stopping_threshold={low} and divergence_threshold={high} overlap for mode={mode!r}: every "
                    "value would stop training. To fix, put the stopping threshold on the good side "
                    f"({'below' if mode == 'min' else 'above'}) of the divergence threshold."
                )

    # -- the decision -----------------------------------------------------------------
    def monitored_name(self, trainer: Any) -> str:
        """The metric this add-on watches in ``trainer``."""
        if self.monitor is not None:
            return self.monitor
        if trainer.monitor is not None:
            return str(trainer.monitor)
        return "valid/loss" if trainer.valid_loader is not None else "train/loss"

    def on_epoch_end(self, trainer: Any) -> None:
        if not _trains(trainer):
            return
        name = self.monitored_name(trainer)
        value = trainer.epoch_metrics.get(name)
        if value is None:
            if name.startswith("valid/") and trainer.valid_loader is not None:
                return  # validation was not due this epoch
            raise TrainerConfigError(
                f"early stopping monitors {name!r}, which the epoch did not produce (it has "
                f"{sorted(trainer.epoch_metrics)}). To fix, set monitor= to one of those."
            )
        reason = self._decide(name, float(value))
        epoch = trainer.progress_checker.epoch
        if self.verbose:
            _log.info("early stopping: epoch %d %s=%.6g best=%s wait=%d/%d", epoch, name, value, self.best,
                      self.wait, self.patience)
        if reason is not None:
            self.stopped_epoch = epoch
            _log.log(logging.WARNING if self.verbose else logging.INFO, "early stopping at epoch %d: %s", epoch, reason)
            trainer.request_stop(f"early stopping: {reason}")

    def _decide(self, name: str, value: float) -> str | None:
        """Update the counters with this epoch's value; return why to stop, or None."""
        mode = self.mode or self.trainer.monitor_mode
        better: Callable[[float, float], bool] = operator.lt if mode == "min" else operator.gt
        if not math.isfinite(value):
            if self.check_finite:
                return f"{name} is {value}"
            self.wait += 1
        else:
            delta = -self.min_delta if mode == "min" else self.min_delta
            if self.best is None or better(value, self.best + delta):
                self.best, self.wait = value, 0
            else:
                self.wait += 1
            if self.stopping_threshold is not None and not better(self.stopping_threshold, value):
                return f"{name} = {value:.6g} reached the stopping threshold {self.stopping_threshold}"
            if self.divergence_threshold is not None and better(self.divergence_threshold, value):
                return f"{name} = {value:.6g} is past the divergence threshold {self.divergence_threshold}"
        if self.wait >= self.patience:
            best = "no finite value" if self.best is None else f"{self.best:.6g}"
            return f"{name} did not improve on {best} for {self.wait} epoch(s) (patience {self.patience})"
        return None

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state.get("best")
        self.best = None if best is None else float(best)
        self.wait = int(state.get("wait", 0))
        stopped = state.get("stopped_epoch")
        self.stopped_epoch = None if stopped is None else int(stopped)


def _trains(trainer: Any) -> bool:
    """Whether this is a training run (``run_kind``; ``mode`` on trainers from before the lean core)."""
    kind = getattr(trainer, "run_kind", None)
    return (kind if kind is not None else trainer.mode) == "train"
