"""Errors raised when a checkpoint cannot be written, found, read or applied.

Each message names the file and says how to fix the problem, because a checkpoint error
usually surfaces hours into a run, far from the code that configured it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointCorruptError",
    "CheckpointUnsafeError",
    "CheckpointWriteError",
    "CheckpointMismatchError",
]


class CheckpointError(Exception):
    """Base class of every checkpoint error; ``path`` is the file concerned (if any)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the given path; the message lists what the folder holds."""


class CheckpointCorruptError(CheckpointError, ValueError):
    """The file exists but is not a complete, readable checkpoint (truncated, garbled, wrong kind)."""


class CheckpointUnsafeError(CheckpointCorruptError):
    """The file holds Python objects whose unpickling could run code; it was refused unread."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing failed (disk full, file-size limit, permissions); temporary files were removed."""


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """The checkpoint's model does not fit this model: missing, unexpected or reshaped keys."""
