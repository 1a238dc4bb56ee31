"""What a person watching the run sees: a progress bar, or one line per epoch, and a summary.

On an interactive terminal this is a tqdm bar over epochs and one over batches (loss and
learning rate in the postfix, refreshed at log points). In a Jupyter notebook the same bars
are notebook widgets (``tqdm.auto``; without ipywidgets tqdm falls back to text bars and says
so). In a non-interactive stream (CI logs, files, pipes) carriage-return animation would flood
the log, so it prints one line per epoch; so does a terminal that reports no size (0 columns
or 0 rows, as some containers and CI runners allocate), where tqdm would draw nothing at all.
"""

from __future__ import annotations

import logging
import os
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
    #: Training seconds of the whole run, across resumes and run() calls (``seconds`` is this
    #: run() call's); None before the run ends.
    run_seconds: float | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    monitor: str | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    stop_reason: str | None = None
    status: str = "running"

    def __str__(self) -> str:
        lines = [
            f"run {self.status}: {self.epochs} epoch(s), {self.steps} step(s), "
            f"{self.samples} sample(s) in {self._time()}"
        ]
        if self.best_value is not None:
            lines.append(f"  best {self.monitor} = {self.best_value:.6g} (epoch {self.best_epoch})")
        if self.final_metrics:
            lines.append("  final: " + format_metrics(self.final_metrics, limit=12))
        if self.stop_reason:
            lines.append(f"  stopped early: {self.stop_reason}")
        return "\n".join(lines)

    def _time(self) -> str:
        total = self.run_seconds
        if total is None or abs(total - self.seconds) < 0.05:
            return f"{self.seconds:.1f}s"
        return f"{total:.1f}s ({self.seconds:.1f}s in this run() call)"


def in_notebook() -> bool:
    """Whether we run inside a Jupyter kernel (where stderr is not a terminal, yet bars render)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def has_terminal_size(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal with a usable size (tqdm draws nothing in 0 rows)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # a tty-like wrapper without a descriptor
        return True
    return size.columns > 0 and size.lines > 0


class ProgressDisplay:
    """Progress for one ``run()``; a no-op when disabled.

    ``interactive`` (bars) on a terminal that reports a size, or in a notebook; otherwise one
    line per epoch.
    """

    def __init__(self, enabled: bool, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.notebook = enabled and stream is None and in_notebook()
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interactive = enabled and (self.notebook or (tty and has_terminal_size(self.stream)))
        self._epoch_bar: Any = None
        self._batch_bar: Any = None

    def _bar(self, **kwargs: Any) -> Any:
        from tqdm.auto import tqdm  # notebook widgets in Jupyter, text bars on a terminal

        if self.notebook:
            return tqdm(**kwargs)
        return tqdm(file=self.stream, **kwargs)

    def start(self, total_epochs: int, first_epoch: int) -> None:
        if not self.interactive:
            return
        self._epoch_bar = self._bar(total=total_epochs, initial=first_epoch, desc="epoch", position=0, leave=True)

    def epoch_begin(self, epoch: int, total_batches: int | None, phase: str = "train") -> None:
        if not self.interactive:
            return
        self._close_batch_bar()
        self._batch_bar = self._bar(total=total_batches, desc=f"{phase} {epoch}", position=1, leave=False)

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
