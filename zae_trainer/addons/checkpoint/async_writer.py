"""Checkpoint writes on a background thread, so the training loop does not wait for the disk.

The training thread copies every tensor to fresh CPU memory (:func:`detached_copy`; the only
part of a save it pays for) and hands the copy to one writer thread. At most one write is in
flight: the next save, and the end of the run, wait for the previous one. An error in the
writer is kept and raised on the training thread at that wait, never lost.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from .errors import CheckpointWriteError

__all__ = ["AsyncWriter", "detached_copy"]


def detached_copy(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are new CPU tensors; tensors sharing memory stay shared."""
    memo: dict[tuple[Any, ...], torch.Tensor] = {}

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                   value.stride(), value.dtype)
            if key not in memo:
                memo[key] = value.detach().to("cpu", copy=True)
            return memo[key]
        if isinstance(value, dict):
            return type(value)((k, copy(v)) for k, v in value.items()) if type(value) is not dict else {
                k: copy(v) for k, v in value.items()
            }
        if isinstance(value, list):
            return [copy(v) for v in value]
        if isinstance(value, tuple):
            return tuple(copy(v) for v in value)
        return value

    return copy(obj)


class AsyncWriter:
    """One background write at a time; errors surface on the caller's thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, what: str, write: Callable[[], None]) -> None:
        """Wait for the previous write (raising its error), then start ``write`` in the background."""
        self.wait()
        self._what = what

        def target() -> None:
            try:
                write()
            except BaseException as exc:  # kept and re-raised on the training thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=target, name="zae-checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight is done; raise its error if it failed."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            if isinstance(error, CheckpointWriteError):
                raise error
            raise CheckpointWriteError(
                f"the background write of checkpoint {self._what!r} failed: {type(error).__name__}: {error}",
                self._what,
            ) from error
