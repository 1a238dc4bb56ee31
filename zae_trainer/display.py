"""What a person watching the run sees: a progress bar, or one line per epoch, and a summary.

On an interactive terminal this is a tqdm bar over epochs and one over batches (loss and
learning rate in the postfix, refreshed at log points). In a non-interactive stream (CI logs,
files, pipes) carriage-return animation would flood the log, so it prints one line per epoch.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import IO, Any, Mapping

__all__ = ["ProgressDisplay", "RunSummary", "format_metrics"]

_log = logging.getLogger("zae_trainer")


def format_metrics(metrics: Mapping[str, float], limit: int = 8) -> str:
    """``train/loss 0.1234  valid/acc 0.9800`` — short, aligned, for one line."""
    parts = [f"{k} {v:.4g}" for k, v in list(metrics.items())[:limit]]
    return "  ".join(parts)


@dataclass
class RunSummary:
    """The numbers a finished (or failed) run reports."""

    epochs: int = 0
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    final_metrics: dict[str, float] = field(default_factory=dict)
    monitor: str | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    stop_reason: str | None = None
    status: str = "running"

    def __str__(self) -> str:
        lines = [
            f"run {self.status}: {self.epochs} epoch(s), {self.steps} step(s), "
            f"{self.samples} sample(s) in {self.seconds:.1f}s"
        ]
        if self.best_value is not None:
            lines.append(f"  best {self.monitor} = {self.best_value:.6g} (epoch {self.best_epoch})")
        if self.final_metrics:
            lines.append("  final: " + format_metrics(self.final_metrics, limit=12))
        if self.stop_reason:
            lines.append(f"  stopped early: {self.stop_reason}")
        return "\n".join(lines)


class ProgressDisplay:
    """Progress for one ``run()``; a no-op when disabled."""

    def __init__(self, enabled: bool, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self._epoch_bar: Any = None
        self._batch_bar: Any = None

    def start(self, total_epochs: int, first_epoch: int) -> None:
        if not self.interactive:
            return
        import tqdm

        self._epoch_bar = tqdm.tqdm(
            total=total_epochs, initial=first_epoch, desc="epoch", position=0, leave=True, file=self.stream
        )

    def epoch_begin(self, epoch: int, total_batches: int | None, phase: str = "train") -> None:
        if not self.interactive:
            return
        import tqdm

        self._close_batch_bar()
        self._batch_bar = tqdm.tqdm(
            total=total_batches, desc=f"{phase} {epoch}", position=1, leave=False, file=self.stream
        )

    def batch_done(self) -> None:
        bar = self._batch_bar
        if bar is not None:
            bar.update(1)

    def show_metrics(self, metrics: Mapping[str, float], lr: float | None) -> None:
        """Called at log points only: the floats already exist, nothing is synchronised here."""
        if self._batch_bar is None:
            return
        postfix = {k.split("/", 1)[-1]: f"{v:.4g}" for k, v in metrics.items() if k.endswith("loss")}
        if lr is not None:
            postfix["lr"] = f"{lr:.2e}"
        self._batch_bar.set_postfix(postfix, refresh=False)

    def epoch_end(self, epoch: int, total: int, metrics: Mapping[str, float], seconds: float) -> None:
        if not self.enabled:
            return
        if self.interactive:
            self._close_batch_bar()
            if self._epoch_bar is not None:
                self._epoch_bar.set_postfix_str(format_metrics(metrics, limit=4), refresh=False)
                self._epoch_bar.update(1)
            return
        print(f"epoch {epoch}/{total}  {format_metrics(metrics)}  ({seconds:.2f}s)", file=self.stream, flush=True)

    def close(self, summary: RunSummary) -> None:
        self._close_batch_bar()
        if self._epoch_bar is not None:
            self._epoch_bar.close()
            self._epoch_bar = None
        if self.enabled:
            print(str(summary), file=self.stream, flush=True)
        else:
            _log.info("%s", summary)

    def _close_batch_bar(self) -> None:
        if self._batch_bar is not None:
            self._batch_bar.close()
            self._batch_bar = None
