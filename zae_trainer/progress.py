"""ProgressChecker: where training is — optimizer steps, batches, epochs, samples.

Counters are 0-based counts of *completed* work (``step == 3`` means three optimizer steps
are done). zae-engine's 1-based getters (``get_step``, ``get_epoch``) are kept: they return
the number of the step / epoch in progress, as zae-engine did.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["ProgressChecker"]


@dataclass
class ProgressChecker:
    """Counts the progress of a run; saved in every checkpoint.

    Attributes
    ----------
    step : int
        Optimizer steps completed (the global step; loggers use it as their x-axis).
        With gradient accumulation this advances once per ``accumulate_grad_batches`` batches.
    batches : int
        Training batches completed, over the whole run.
    epoch : int
        Epochs completed.
    samples : int
        Training samples seen, over the whole run.
    batch_in_epoch : int
        Training batches completed in the current epoch (the data position for resume).
    skipped_steps : int
        Optimizer steps skipped through ``SkipStep``.

    Examples
    --------
    >>> pc = ProgressChecker()
    >>> pc.get_step(), pc.get_epoch()
    (1, 1)
    >>> pc.update_step(); pc.step
    1
    """

    step: int = 0
    batches: int = 0
    epoch: int = 0
    samples: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0

    # -- zae-engine compatible API (1-based "current" numbers) ---------------------
    def get_step(self) -> int:
        """The 1-based number of the step in progress (zae-engine semantics)."""
        return self.step + 1

    def get_epoch(self) -> int:
        """The 1-based number of the epoch in progress (zae-engine semantics)."""
        return self.epoch + 1

    def update_step(self) -> None:
        """Count one completed optimizer step."""
        self.step += 1

    def update_epoch(self) -> None:
        """Count one completed epoch and reset the in-epoch position."""
        self.epoch += 1
        self.batch_in_epoch = 0

    def init_state(self) -> None:
        """Reset every counter, as at the start of a fresh run."""
        for f in fields(self):
            setattr(self, f.name, 0)

    # -- checkpoint protocol ------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Plain ints only, so it fits every checkpoint format."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # asdict's result, without its deep copies

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters; unknown keys are an error, missing ones keep their value."""
        known = {f.name for f in fields(self)}
        unknown = set(state) - known
        if unknown:
            raise KeyError(
                f"ProgressChecker state has unknown keys {sorted(unknown)}; expected a subset of {sorted(known)}"
            )
        for key, value in state.items():
            setattr(self, key, int(value))
