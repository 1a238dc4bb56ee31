"""LocalLoggerAddon: metrics on disk, no account needed — the default logger.

In ``log_dir`` it writes

* ``metrics.jsonl`` — one JSON object per record, appended and flushed as it happens, so a
  crash loses nothing already logged. ``{"kind": "step", "step": 20, "epoch": 1, "time": 1.9,
  "train/loss": 0.41, "lr": 0.1}`` at each log point; ``{"kind": "epoch", ...,
  "train/loss": ..., "valid/loss": ...}`` at each epoch end. Names are the trainer's own
  (``trainer.epoch_metrics``); ``kind`` tells step rows from epoch rows. Non-finite values
  are written as ``NaN`` / ``Infinity`` (Python's ``json`` and pandas read them).

  ``step`` is the optimizer steps completed. ``epoch`` is 1-based in both kinds of row: a
  step row names the epoch it was logged in (``1`` during the first epoch), an epoch row
  the epoch that just ended. ``time`` is seconds of training since the run's first start;
  a resumed run continues it from the restored checkpoint's value instead of restarting
  at 0 (time lost after a crash's last checkpoint, and between processes, is not counted).
* ``metrics.csv`` — the same rows as a table (``kind, step, epoch, time, <metrics...>``). Rows
  are appended; the file is rewritten only when a record brings a new column.
* ``config.json`` at the start of a run, ``summary.json`` at its end: ``epochs``,
  ``steps``, ``samples`` and ``seconds`` cover the whole run across resumes (``seconds`` on
  the same clock as ``time``), ``process_seconds`` the last ``run()`` call alone, plus
  ``status``, ``stop_reason``, ``best/*`` and ``final_metrics``.
* ``tensorboard/`` — TensorBoard event files, when ``tensorboard`` is installed. Epoch
  metrics there are tagged ``epoch/<name>`` (one tag cannot hold both the step value and
  the epoch mean of ``train/loss`` at the same step).
* ``metrics.png`` — the loss and metric curves, drawn at the end of the run, when asked for
  (``plot=True``, needs ``matplotlib``; off by default, so having matplotlib installed
  changes nothing).

A run that starts at step 0 replaces these files. A resumed run (the state manager restored
a checkpoint, so the step is past 0) keeps the records up to the restored step and drops the
ones a crashed process wrote after its last checkpoint, so curves never hold two values for
one step; TensorBoard gets ``purge_step`` for the same reason.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import io
import json
import math
import os
from typing import Any

from ._logging_common import EPOCH_PREFIX, LoggerAddOn, LoggingBackendWarning

__all__ = ["LocalLoggerAddon", "read_jsonl", "LoggingBackendWarning"]

PathLike = str | os.PathLike[str]

_FIXED = ("kind", "step", "epoch", "time")
_MAX_PANELS = 12


class LocalLoggerAddon(LoggerAddOn):
    """Log metrics to files in ``log_dir``: JSON lines, CSV, TensorBoard, and a PNG of the curves.

    Parameters
    ----------
    log_dir : str or PathLike
        Folder for the files (created if missing). Use one folder per run.
    tensorboard : bool or None
        Write TensorBoard event files under ``log_dir/tensorboard``. ``None`` (default): when
        the ``tensorboard`` package is installed. ``True`` without it fails at construction.
    plot : bool
        Draw ``metrics.png`` at the end of every run (default False). ``True`` without
        ``matplotlib`` installed fails at construction. Drawing is opt-in because it costs
        seconds at the end of a run and writes a file nobody asked for.

    Examples
    --------
    >>> Trainer.add_on(LocalLoggerAddon(log_dir="runs/exp1", plot=True))  # doctest: +SKIP
    >>> Trainer.add_on("local_logger")(model, optimizer=opt, log_dir="runs/exp1")  # doctest: +SKIP
    """

    name = "local_logger"
    backend = "local logger"

    def __init__(self, *, log_dir: PathLike, tensorboard: bool | None = None, plot: bool = False) -> None:
        super().__init__()
        self.log_dir = os.fspath(log_dir)
        self.tensorboard = _optional_feature("tensorboard", tensorboard, "tensorboard")
        if plot is not None and not isinstance(plot, bool):
            raise TypeError(f"LocalLoggerAddon: plot must be True or False, got {plot!r}")
        self.plot = _optional_feature("plot", bool(plot), "matplotlib")
        self._records: list[dict[str, Any]] | None = None
        self._columns: list[str] = []
        self._jsonl: io.TextIOWrapper | None = None
        self._csv: io.TextIOWrapper | None = None
        self._writer: Any = None  # TensorBoard SummaryWriter

    @property
    def jsonl_path(self) -> str:
        return os.path.join(self.log_dir, "metrics.jsonl")

    @property
    def csv_path(self) -> str:
        return os.path.join(self.log_dir, "metrics.csv")

    @property
    def plot_path(self) -> str:
        return os.path.join(self.log_dir, "metrics.png")

    @property
    def tensorboard_dir(self) -> str:
        return os.path.join(self.log_dir, "tensorboard")

    # ==================================================================================
    # LoggerAddOn
    # ==================================================================================
    def _open(self, trainer: Any) -> bool:
        os.makedirs(self.log_dir, exist_ok=True)
        pc = trainer.progress_checker
        if pc.step == 0:
            records: list[dict[str, Any]] = []
        else:
            previous = self._records if self._records is not None else read_jsonl(self.jsonl_path)
            records = [r for r in previous if _before_resume_point(r, pc.step, pc.epoch)]
        self._records = records
        self._columns = _columns_of(records)
        self._rewrite()
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._csv = open(self.csv_path, "a", encoding="utf-8", newline="")
        if self.tensorboard:
            self._writer = self._open_tensorboard(pc.step)
        return True

    def _write_config(self, config: dict[str, Any]) -> None:
        _write_json(os.path.join(self.log_dir, "config.json"), config)

    def _write_step(self, step: int, record: dict[str, float]) -> None:
        epoch = self.trainer.progress_checker.epoch + 1  # the epoch in progress, 1-based
        self._append({"kind": "step", "step": step, "epoch": epoch, "time": self._elapsed(), **record})
        if self._writer is not None:
            for key, value in record.items():
                self._writer.add_scalar(key, value, step)

    def _write_epoch(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self._append({"kind": "epoch", "step": step, "epoch": epoch, "time": self._elapsed(), **metrics})
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(EPOCH_PREFIX + key, value, step)

    def _write_test(self, trainer: Any, metrics: dict[str, float]) -> None:
        # One entry per trainer.test() call (best and last weights, say), beside summary.json,
        # which stays the training run's.
        path = os.path.join(self.log_dir, "test.json")
        previous: list[Any] = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                previous = json.load(handle)
        pc = trainer.progress_checker
        os.makedirs(self.log_dir, exist_ok=True)
        _write_json(path, [*previous, {"step": pc.step, "epoch": pc.epoch, "metrics": metrics}])

    def _write_summary(self, trainer: Any, summary: dict[str, Any]) -> None:
        data = dict(summary)
        data["final_metrics"] = dict(trainer.summary.final_metrics)
        _write_json(os.path.join(self.log_dir, "summary.json"), data)

    def _close(self, outcome: str) -> None:
        for handle in (self._jsonl, self._csv):
            if handle is not None:
                handle.close()
        self._jsonl = self._csv = None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        if self.plot and self._records:
            draw_curves(self._records, self.plot_path)

    # ==================================================================================
    # Files
    # ==================================================================================
    def _elapsed(self) -> float:
        return round(self.run_seconds, 6)

    def _append(self, record: dict[str, Any]) -> None:
        if self._jsonl is None or self._csv is None or self._records is None:
            return  # a LOG outside run() (run_batch called by hand): nothing is open
        self._records.append(record)
        # Each float is formatted once, for both files: the shortest round-trip text of a
        # float costs more than the rest of a record's line, and a log point has a dozen.
        texts = {k: float.__repr__(v) for k, v in record.items() if isinstance(v, float)}
        self._jsonl.write(_json_line(record, texts) + "\n")
        self._jsonl.flush()
        new = [k for k in record if k not in self._columns]
        if new:  # the header changes: rewrite the table once with the new column
            self._columns.extend(new)
            self._csv.close()
            _write_csv(self.csv_path, self._columns, self._records)
            self._csv = open(self.csv_path, "a", encoding="utf-8", newline="")
        else:
            csv.writer(self._csv).writerow([texts[c] if c in texts else _cell(record.get(c)) for c in self._columns])
        self._csv.flush()

    def _rewrite(self) -> None:
        assert self._records is not None
        with open(self.jsonl_path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in self._records)
        _write_csv(self.csv_path, self._columns, self._records)

    def _open_tensorboard(self, step: int) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        if step == 0:  # a fresh run replaces the folder's earlier event files, like the other files
            for old in glob.glob(os.path.join(self.tensorboard_dir, "events.out.tfevents.*")):
                os.remove(old)
            return SummaryWriter(self.tensorboard_dir)
        # Events a crashed process wrote after the restored step are hidden by TensorBoard.
        return SummaryWriter(self.tensorboard_dir, purge_step=step + 1)


# ======================================================================================
# Reading and drawing
# ======================================================================================
def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a crash mid-write) is dropped."""
    records: list[dict[str, Any]] = []
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def draw_curves(records: list[dict[str, Any]], path: PathLike) -> str:
    """Draw each metric against the step into a PNG: step values as lines, epoch values as dots.

    ``train/loss`` and ``valid/loss`` share the ``loss`` panel; every other name gets its own.
    Uses matplotlib's object API (no pyplot), so it changes no global backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: dict[str, dict[str, tuple[list[float], list[float], str]]] = {}
    for record in records:
        kind = record.get("kind", "step")
        for key, value in record.items():
            if key in _FIXED or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            phase, _, metric = key.partition("/")
            panel = metric if phase in ("train", "valid", "test") and metric else key
            label = f"{key} ({kind})"
            xs, ys, _ = panels.setdefault(panel, {}).setdefault(label, ([], [], kind))
            xs.append(record["step"])
            ys.append(value)
    names = sorted(panels, key=lambda n: (n != "loss", n))[:_MAX_PANELS]
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    figure = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(rows, cols, squeeze=False).flat)
    for ax, name in zip(axes, names):
        for label, (xs, ys, kind) in sorted(panels[name].items()):
            if kind == "epoch":
                ax.plot(xs, ys, "o--", label=label, markersize=4)
            else:
                ax.plot(xs, ys, "-", label=label, linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    target = os.fspath(path)
    temporary = target + ".tmp.png"
    figure.savefig(temporary, dpi=90)
    os.replace(temporary, target)
    return target


# ======================================================================================
# Helpers
# ======================================================================================
def _optional_feature(setting: str, wanted: bool | None, module: str) -> bool:
    installed = importlib.util.find_spec(module) is not None
    if wanted is None:
        return installed
    if wanted and not installed:
        extra = "plot" if module == "matplotlib" else module
        instead = f"pass {setting}=None to use it only when installed" if module != "matplotlib" else "pass plot=False"
        raise ImportError(
            f"LocalLoggerAddon({setting}=True) needs the {module!r} package. To fix, pip install "
            f"zae_trainer[{extra}], or {instead}."
        )
    return bool(wanted)


def _before_resume_point(record: dict[str, Any], step: int, epoch: int) -> bool:
    if record.get("kind") == "epoch":
        return int(record.get("epoch", 0)) <= epoch
    return int(record.get("step", 0)) <= step


def _columns_of(records: list[dict[str, Any]]) -> list[str]:
    columns = list(_FIXED)
    for record in records:
        columns.extend(k for k in record if k not in columns)
    return columns


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return float.__repr__(value)  # a numpy float's repr() would be "np.float64(...)"
    return value


def _json_line(record: dict[str, Any], float_texts: dict[str, str]) -> str:
    """``json.dumps(record)``, taking finite floats' text from ``float_texts`` (what json writes for them)."""
    parts = []
    for key, value in record.items():
        text = float_texts.get(key)
        if text is None or not math.isfinite(value):  # NaN/Infinity: json's own spelling
            text = json.dumps(value)
        parts.append(f"{_json_key(key)}: {text}")
    return "{" + ", ".join(parts) + "}"


_KEY_TEXTS: dict[str, str] = {}


def _json_key(key: str) -> str:
    """A record key as JSON text; keys repeat at every log point, so each is encoded once."""
    text = _KEY_TEXTS.get(key)
    if text is None:
        if len(_KEY_TEXTS) < 10_000:  # metric names are few; do not grow without bound
            text = _KEY_TEXTS[key] = json.dumps(str(key))
        else:
            text = json.dumps(str(key))
    return text


def _write_csv(path: str, columns: list[str], records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(columns)
        out.writerows([_cell(r.get(c)) for c in columns] for r in records)


def _write_json(path: str, data: Any) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, default=repr)
    os.replace(temporary, path)
