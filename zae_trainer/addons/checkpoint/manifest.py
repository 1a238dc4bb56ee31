"""``manifest.json``: which checkpoints exist in a folder, which is latest, which is best.

The manifest is the only thing that makes a checkpoint visible: a file is written (and
renamed into place) first, the manifest naming it second. A crash between the two leaves
an unnamed but harmless file; a crash before leaves only a temporary file. Retention is
decided here (:meth:`Manifest.retain`): the newest ``keep_last``, the best ``top_k`` of each
:class:`Monitor`, the periodic checkpoints by their own rule, and the latest, always.

"Best" has one rule everywhere (:func:`improves`): a value must be *strictly* better to
count, so among equal values the earliest checkpoint stays best. The trainer's own best
tracking, early stopping, top-k ranking and retention all agree on it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Sequence

from .atomic import write_file_atomic
from .errors import CheckpointCorruptError

__all__ = ["Entry", "Manifest", "Monitor", "MANIFEST_NAME", "improves"]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2  # version 1 had no "best_by"; both are read


def improves(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` is strictly better than ``best`` by more than ``min_delta``.

    Ties are not improvements: the earliest epoch to reach a value stays best. ``best=None``
    (nothing yet) is beaten by any finite value.

    >>> improves(0.5, 0.5, "max"), improves(0.6, 0.5, "max"), improves(0.4, None, "min")
    (False, True, True)
    """
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@dataclass(frozen=True)
class Monitor:
    """One "best" criterion: rank checkpoints by ``metric`` (``mode``) and keep the best ``top_k``.

    ``metric=None`` ranks by the entry's own ``value``: the trainer's monitored metric.
    """

    metric: str | None
    mode: str = "min"
    top_k: int = 1


@dataclass
class Entry:
    """One checkpoint: where it is, when it was taken, and how good it was.

    Complete before :meth:`Manifest.add` and not changed after it (the manifest keeps each
    entry's JSON line).
    """

    name: str  # file or folder name inside the checkpoint folder
    epoch: int  # epochs completed when saved
    step: int  # optimizer steps completed when saved
    batch_in_epoch: int
    reasons: list[str]  # why it was saved: "best", "last", "step", "epoch", "interrupt", "exception", "manual"
    monitor: str | None = None
    value: float | None = None  # the trainer's monitored metric, when saved at an epoch end
    metrics: dict[str, Any] = field(default_factory=dict)
    size: int | None = None  # bytes of a single-file checkpoint, to spot truncation
    saved_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _ENTRY_FIELDS}  # what asdict gives, without deep copies
        data["reasons"] = list(self.reasons)
        data["metrics"] = {k: _finite_or_text(v) for k, v in self.metrics.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Entry":
        return cls(**data)

    def score(self, metric: str | None) -> float | None:
        """The value this entry is ranked by for ``metric`` (None: the trainer's monitor)."""
        value = self.value if metric is None else self.metrics.get(metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)


_ENTRY_FIELDS = tuple(f.name for f in fields(Entry))


def _finite_or_text(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else repr(value)


class Manifest:
    """The checkpoints of one folder, oldest first.

    ``mode`` is the direction of the trainer's monitored metric (the entries' ``value``);
    ``monitors`` names further criteria whose best entries :meth:`write` records under
    ``best_by``.
    """

    def __init__(self, folder: str, entries: Iterable[Entry] = (), mode: str = "min",
                 monitors: Sequence[Monitor] = ()) -> None:
        self.folder = folder
        self.entries: list[Entry] = list(entries)
        self.mode = mode
        self.monitors: list[Monitor] = [m for m in monitors if m.metric is not None]
        #: each entry's JSON line, made once: entries are not changed after they are added,
        #: and the manifest is rewritten at every save (float repr is most of json's work)
        self._lines: dict[int, tuple[Entry, str]] = {}

    @property
    def path(self) -> str:
        return os.path.join(self.folder, MANIFEST_NAME)

    # -- reading / writing --------------------------------------------------------------
    @classmethod
    def load(cls, folder: str, mode: str = "min", monitors: Sequence[Monitor] = ()) -> "Manifest":
        """The folder's manifest; an empty one if the folder has none yet."""
        path = os.path.join(folder, MANIFEST_NAME)
        if not os.path.exists(path):
            return cls(folder, mode=mode, monitors=monitors)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            entries = [Entry.from_json(e) for e in data["checkpoints"]]
        except Exception as exc:  # any damage (bad JSON, wrong shapes, wrong keys) is one error
            raise CheckpointCorruptError(
                f"{path!r} is not a valid checkpoint manifest ({type(exc).__name__}: {exc}). To fix, delete it "
                "and load a checkpoint by its path.",
                path,
            ) from exc
        return cls(folder, entries, mode=mode, monitors=monitors)

    def write(self) -> None:
        best = self.best()
        data = {
            "manifest_version": MANIFEST_VERSION,
            "latest": self.entries[-1].name if self.entries else None,
            "best": best.name if best else None,
            "mode": self.mode,
            "best_by": {m.metric: (b.name if (b := self.best(m.metric, m.mode)) else None) for m in self.monitors},
        }
        # One checkpoint per line, each line by json's C encoder (``indent=`` would switch the
        # whole document to its pure-Python encoder, written at every save).
        lines = [self._line(e) for e in self.entries]
        listed = "\n  " + ",\n  ".join(lines) + "\n " if lines else ""
        text = (json.dumps(data, allow_nan=False)[:-1] + f',\n "checkpoints": [{listed}]}}\n').encode("utf-8")
        write_file_atomic(self.path, lambda f: f.write(text))

    def _line(self, entry: Entry) -> str:
        cached = self._lines.get(id(entry))
        if cached is None or cached[0] is not entry:
            if len(self._lines) > 4 * len(self.entries):  # forget dropped entries now and then
                self._lines = {id(e): c for e in self.entries if (c := self._lines.get(id(e))) and c[0] is e}
            cached = self._lines[id(entry)] = (entry, json.dumps(entry.to_json(), allow_nan=False))
        return cached[1]

    # -- queries ------------------------------------------------------------------------
    def latest(self) -> Entry | None:
        return self.entries[-1] if self.entries else None

    def ranked(self, metric: str | None = None, mode: str | None = None) -> list[Entry]:
        """Entries with a finite score, best first; among equal scores the earliest first.

        ``metric=None`` ranks by the trainer's monitored value in the manifest's ``mode``.
        """
        mode = mode or (self.mode if metric is None else self._mode_of(metric))
        sign = 1.0 if mode == "min" else -1.0
        scored = [(sign * s, i, e) for i, e in enumerate(self.entries) if (s := e.score(metric)) is not None]
        scored.sort(key=lambda t: (t[0], t[1]))
        return [e for _, _, e in scored]

    def best(self, metric: str | None = None, mode: str | None = None) -> Entry | None:
        ranked = self.ranked(metric, mode)
        return ranked[0] if ranked else None

    def candidates(self, which: str) -> list[Entry]:
        """Entries to try for ``"latest"`` (newest first), ``"best"`` or ``"best:<metric>"`` (best first)."""
        if which == "best":
            return self.ranked()
        if which.startswith("best:"):
            return self.ranked(which[5:])
        return list(reversed(self.entries))

    def would_rank(self, value: float | None, top_k: int, metric: str | None = None, mode: str | None = None) -> bool:
        """Whether a new checkpoint scoring ``value`` would be among the best ``top_k``.

        A value equal to the k-th best does not enter: the earlier checkpoint keeps its place.
        """
        if value is None or top_k <= 0 or not math.isfinite(value):
            return False
        ranked = self.ranked(metric, mode)
        if len(ranked) < top_k:
            return True
        return improves(value, ranked[top_k - 1].score(metric), mode or self._mode_of(metric))

    def _mode_of(self, metric: str | None) -> str:
        for m in self.monitors:
            if m.metric == metric:
                return m.mode
        return self.mode

    # -- changes ------------------------------------------------------------------------
    def add(self, entry: Entry) -> None:
        self.entries = [e for e in self.entries if e.name != entry.name]
        self.entries.append(entry)

    def retain(self, keep_last: int, top_k: int | Sequence[Monitor], keep_periodic: int | None = None,
               periodic_reason: str = "epoch") -> list[Entry]:
        """Keep what some rule keeps; drop and return the rest.

        Kept: the newest ``keep_last``; the latest (resume needs it); for each monitor, its
        best ``top_k`` (``top_k`` as an int means the trainer's monitor alone); entries saved
        for ``periodic_reason``: the newest ``keep_periodic`` of them, all of them when None.
        """
        monitors = [Monitor(None, self.mode, top_k)] if isinstance(top_k, int) else list(top_k)
        keep = {id(e) for e in self.entries[-keep_last:]} if keep_last > 0 else set()
        if self.entries:
            keep.add(id(self.entries[-1]))
        for m in monitors:
            keep |= {id(e) for e in self.ranked(m.metric, m.mode)[: max(m.top_k, 0)]}
        periodic = [e for e in self.entries if periodic_reason in e.reasons]
        if keep_periodic is None:
            keep |= {id(e) for e in periodic}
        elif keep_periodic > 0:
            keep |= {id(e) for e in periodic[-keep_periodic:]}
        dropped = [e for e in self.entries if id(e) not in keep]
        self.entries = [e for e in self.entries if id(e) in keep]
        return dropped

    def forget(self, names: Iterable[str]) -> bool:
        """Remove entries by name (their files are gone); return whether any was listed."""
        gone = set(names)
        before = len(self.entries)
        self.entries = [e for e in self.entries if e.name not in gone]
        return len(self.entries) != before
