"""``manifest.json``: which checkpoints exist in a folder, which is latest, which is best.

The manifest is the only thing that makes a checkpoint visible: a file is written (and
renamed into place) first, the manifest naming it second. A crash between the two leaves
an unnamed but harmless file; a crash before leaves only a temporary file. Retention
(top-k by the monitored metric, the last few by time) is decided here, and files are
deleted only after a manifest that no longer names them has been written.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from .atomic import write_file_atomic
from .errors import CheckpointCorruptError

__all__ = ["Entry", "Manifest", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass
class Entry:
    """One checkpoint: where it is, when it was taken, and how good it was."""

    name: str  # file or folder name inside the checkpoint folder
    epoch: int  # epochs completed when saved
    step: int  # optimizer steps completed when saved
    batch_in_epoch: int
    reasons: list[str]  # why it was saved: "best", "last", "step", "epoch", "interrupt", "exception", "manual"
    monitor: str | None = None
    value: float | None = None  # the monitored metric, when saved at an epoch end
    metrics: dict[str, Any] = field(default_factory=dict)
    size: int | None = None  # bytes of a single-file checkpoint, to spot truncation
    saved_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["metrics"] = {k: _finite_or_text(v) for k, v in self.metrics.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Entry":
        return cls(**data)


def _finite_or_text(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else repr(value)


class Manifest:
    """The checkpoints of one folder, oldest first."""

    def __init__(self, folder: str, entries: Iterable[Entry] = (), mode: str = "min") -> None:
        self.folder = folder
        self.entries: list[Entry] = list(entries)
        self.mode = mode

    @property
    def path(self) -> str:
        return os.path.join(self.folder, MANIFEST_NAME)

    # -- reading / writing --------------------------------------------------------------
    @classmethod
    def load(cls, folder: str, mode: str = "min") -> "Manifest":
        """The folder's manifest; an empty one if the folder has none yet."""
        path = os.path.join(folder, MANIFEST_NAME)
        if not os.path.exists(path):
            return cls(folder, mode=mode)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            entries = [Entry.from_json(e) for e in data["checkpoints"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointCorruptError(
                f"{path!r} is not a valid checkpoint manifest ({type(exc).__name__}: {exc}). To fix, delete it "
                "and load a checkpoint by its path.",
                path,
            ) from exc
        return cls(folder, entries, mode=mode)

    def write(self) -> None:
        best = self.best()
        data = {
            "manifest_version": MANIFEST_VERSION,
            "latest": self.entries[-1].name if self.entries else None,
            "best": best.name if best else None,
            "mode": self.mode,
            "checkpoints": [e.to_json() for e in self.entries],
        }
        text = json.dumps(data, indent=1, allow_nan=False).encode("utf-8")
        write_file_atomic(self.path, lambda f: f.write(text))

    # -- queries ------------------------------------------------------------------------
    def latest(self) -> Entry | None:
        return self.entries[-1] if self.entries else None

    def ranked(self) -> list[Entry]:
        """Entries with a monitored value, best first (ties: the newer first)."""
        scored = [(i, e) for i, e in enumerate(self.entries) if e.value is not None]
        sign = 1.0 if self.mode == "min" else -1.0
        scored.sort(key=lambda pair: (sign * pair[1].value, -pair[0]))  # type: ignore[operator]
        return [e for _, e in scored]

    def best(self) -> Entry | None:
        ranked = self.ranked()
        return ranked[0] if ranked else None

    def candidates(self, which: str) -> list[Entry]:
        """Entries to try for ``resume="latest"`` (newest first) or ``"best"`` (best first)."""
        if which == "best":
            return self.ranked()
        return list(reversed(self.entries))

    def would_rank(self, value: float | None, top_k: int) -> bool:
        """Whether a checkpoint with ``value`` would be among the best ``top_k``."""
        if value is None or top_k <= 0 or math.isnan(value):
            return False
        ranked = self.ranked()
        if len(ranked) < top_k:
            return True
        worst = ranked[top_k - 1].value
        assert worst is not None
        return value < worst if self.mode == "min" else value > worst

    # -- changes ------------------------------------------------------------------------
    def add(self, entry: Entry) -> None:
        self.entries = [e for e in self.entries if e.name != entry.name]
        self.entries.append(entry)

    def retain(self, keep_last: int, top_k: int) -> list[Entry]:
        """Drop entries outside the newest ``keep_last`` and the best ``top_k``; return the dropped."""
        keep = {id(e) for e in self.entries[-keep_last:]} if keep_last > 0 else set()
        if self.entries:
            keep.add(id(self.entries[-1]))  # the latest is always kept: resume needs it
        keep |= {id(e) for e in self.ranked()[: max(top_k, 0)]}
        dropped = [e for e in self.entries if id(e) not in keep]
        self.entries = [e for e in self.entries if id(e) in keep]
        return dropped
