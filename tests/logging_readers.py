"""Read back what the real W&B client wrote offline, for the logger tests.

An offline W&B run is a ``run-<id>.wandb`` transaction log: a 7-byte file header
(``":W&B"``, magic ``0xBEE1``, version 0), then LevelDB-log style records in 32 KiB blocks,
each chunk with a 7-byte header (CRC-32, length, type: full / first / middle / last), the
chunks of one record joined into a serialized ``wandb.proto.wandb_internal_pb2.Record``.
The installed wandb (0.2x/0.3x) ships no Python reader for it, so this is one; it checks
every chunk's CRC so a format change fails loudly instead of reading garbage.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class WandbRunLog:
    """The parts of a W&B run log the tests assert on."""

    run_id: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)  # history rows in order, ``_step`` kept
    axes: dict[str, str] = field(default_factory=dict)  # metric -> declared step metric (define_metric)
    glob_axes: dict[str, str] = field(default_factory=dict)  # "prefix*" -> step metric
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None
    resumed: bool = False

    def axis(self, key: str) -> str:
        """The x-axis W&B plots ``key`` against: its declared step metric, else ``_step``."""
        if key in self.axes:
            return self.axes[key]
        for pattern, axis in sorted(self.glob_axes.items(), key=lambda kv: -len(kv[0])):
            if key.startswith(pattern[:-1]) and key != axis:
                return axis
        return "_step"

    def series(self, key: str) -> list[tuple[Any, Any]]:
        """``[(x, value)]`` of ``key`` in row order, x on the key's declared axis."""
        axis = self.axis(key)
        return [(row.get(axis), row[key]) for row in self.rows if key in row]

    def steps(self) -> list[int]:
        """The ``trainer/step`` of every row that holds a step metric (``train/loss``)."""
        return [row["trainer/step"] for row in self.rows if "train/loss" in row]

    def keys(self) -> set[str]:
        """Every user-visible key logged (W&B's own ``_``-keys left out)."""
        return {k for row in self.rows for k in row if not k.startswith("_")}


def wandb_run_files(wandb_dir: str | os.PathLike[str], run_id: str) -> list[str]:
    """Every ``.wandb`` file of run ``run_id`` (one per process that logged to it), oldest first."""
    found = glob.glob(os.path.join(os.fspath(wandb_dir), "**", f"run-{run_id}.wandb"), recursive=True)
    found = [path for path in found if os.sep + "latest-run" + os.sep not in path]  # a link to one of them
    return sorted(found, key=lambda path: os.stat(path).st_mtime_ns)


def wandb_run_file(wandb_dir: str | os.PathLike[str], run_id: str) -> str:
    """The newest ``.wandb`` file of run ``run_id`` under ``wandb_dir`` (resumed runs write one per process)."""
    found = glob.glob(os.path.join(os.fspath(wandb_dir), "**", f"run-{run_id}.wandb"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no run-{run_id}.wandb under {wandb_dir}")
    # By last write, not by name: a run resumed within the same second gets the folder
    # "offline-run-<time>-<id>-1", which sorts *before* "offline-run-<time>-<id>/".
    return max(found, key=lambda path: os.stat(path).st_mtime_ns)


def read_wandb_records(path: str | os.PathLike[str]) -> list[Any]:
    """Every ``Record`` protobuf in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as fh:
        data = fh.read()
    if len(data) < _HEADER:  # not written yet
        return []
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"unknown .wandb header {data[:_HEADER]!r}"
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left  # zero padding up to the next block
            continue
        if pos + _HEADER + length > len(data):  # the writer is still at it
            break
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"bad CRC at byte {pos} of {path}"
        pos += _HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def read_wandb_run(path: str | os.PathLike[str], timeout: float = 30.0, wait_for_exit: bool = True) -> WandbRunLog:
    """History rows, declared axes, the final summary, the config, artifacts and the exit code.

    ``run.finish()`` can return before W&B's service has flushed the log to disk (seen on a
    loaded machine), so this waits up to ``timeout`` seconds for the run's exit record
    (``wait_for_exit=False``: a killed process's log, which has none, is read as it is).
    """
    deadline = time.monotonic() + timeout
    records = read_wandb_records(path)
    while wait_for_exit and not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.05)
        records = read_wandb_records(path)
    log = WandbRunLog()
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            log.run_id = record.run.run_id
            log.resumed = bool(record.run.resumed)
            for item in record.run.config.update:
                log.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                log.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            row = {"_step": record.history.step.num}
            for item in record.history.item:
                name = _key(item)
                if not name.startswith("_") or name == "_step":
                    row[name] = json.loads(item.value_json)
            log.rows.append(row)
        elif kind == "metric":
            if record.metric.glob_name:
                log.glob_axes[record.metric.glob_name] = record.metric.step_metric
            elif record.metric.step_metric:
                log.axes[record.metric.name] = record.metric.step_metric
        elif kind == "summary":
            for item in record.summary.update:
                log.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "artifact":
            log.artifacts.append({"name": record.artifact.name, "type": record.artifact.type,
                                  "aliases": list(record.artifact.aliases),
                                  "files": [e.path for e in record.artifact.manifest.contents]})
        elif kind == "exit":
            log.exit_code = record.exit.exit_code
    return log


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)
