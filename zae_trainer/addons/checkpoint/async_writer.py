"""Checkpoint writes on a background thread, so the training loop does not wait for the disk.

The training thread copies every tensor to fresh CPU memory (:func:`detached_copy`; the only
part of a save it pays for) and hands the copy to one writer thread. At most one write is in
flight: the next save, and the end of the run, wait for the previous one. An error in the
writer is kept and raised on the training thread at that wait, never lost.

The thread is not a daemon: when the interpreter exits normally, Python waits for it, so a
checkpoint write or a retention deletion in flight is finished, not cut off.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from .errors import CheckpointWriteError

__all__ = ["AsyncWriter", "detached_copy"]


def detached_copy(obj: Any, pool: dict[str, torch.Tensor] | None = None) -> Any:
    """A copy of ``obj`` whose tensors are separate CPU tensors; tensors sharing memory stay shared.

    With ``pool``, buffers from the previous copy are reused when a tensor at the same place
    in the tree has the same shape and dtype: copying into memory that is already mapped is
    several times faster than allocating 400 MB afresh (page faults), and that copy is what
    the training loop waits for. The caller must not reuse a pool while a write still reads it.
    """
    memo: dict[tuple[Any, ...], torch.Tensor] = {}

    def copy(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                   value.stride(), value.dtype)
            if key not in memo:
                buffer = pool.get(path) if pool is not None else None
                if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                    buffer = torch.empty(value.shape, dtype=value.dtype, device="cpu")
                    if pool is not None:
                        pool[path] = buffer
                memo[key] = buffer.copy_(value.detach())
            return memo[key]
        if isinstance(value, dict):
            items = [(k, copy(v, f"{path}/{k}")) for k, v in value.items()]
            return dict(items) if type(value) is dict else type(value)(items)
        if isinstance(value, list):
            return [copy(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(copy(v, f"{path}/{i}") for i, v in enumerate(value))
        return value

    return copy(obj, "")


class AsyncWriter:
    """One background write at a time; errors surface on the caller's thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""
        #: CPU buffers reused from one snapshot to the next (see :func:`detached_copy`)
        self.pool: dict[str, torch.Tensor] = {}

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

        self._thread = threading.Thread(target=target, name="zae-checkpoint-writer", daemon=False)
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
