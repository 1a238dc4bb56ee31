"""SIGINT / SIGTERM during ``run()``: a clean stop at the next batch boundary.

:class:`StopSignals` is a context manager the loop enters for the length of ``run()``. While
it is active, SIGINT and SIGTERM only record that they arrived (``pending``); the loop looks
at that flag after each batch, fires ``Event.INTERRUPT`` (so the state manager can write an
emergency checkpoint from a consistent state) and stops. A second SIGINT interrupts at once,
for a run that is stuck inside a batch. The previous handlers are restored on exit, also when
the run raised. Handlers can only be installed in the main thread; elsewhere (and with
``enabled=False``) the context does nothing and signals keep their usual meaning.

Nothing is installed at import time.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["StopSignals"]


class StopSignals:
    """Turn SIGINT/SIGTERM into a flag for the duration of a ``with`` block.

    Attributes
    ----------
    pending : int or None
        The number of the first signal that arrived, until the block exits.

    Examples
    --------
    >>> with StopSignals(enabled=True) as signals:
    ...     signals.pending is None
    True
    """

    HANDLED = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.pending: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.pending = signum

    def __enter__(self) -> "StopSignals":
        self.pending = None
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in self.HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        previous, self._previous = self._previous, {}
        for signum, old in previous.items():
            signal.signal(signum, old)
        self.pending = None
