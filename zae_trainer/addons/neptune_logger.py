"""NeptuneLoggerAddon: Neptune (``neptune`` 1.x client) tracking, including offline mode.

Neptune's hosted service has been shut down. This add-on keeps working as it did, for what
still runs: self-hosted Neptune servers (``api_token`` / ``NEPTUNE_API_TOKEN`` naming your
server), and **offline mode**, which needs no server at all: the client writes every
operation under ``.neptune/offline/run__<id>__.../`` (or ``$NEPTUNE_DATA_DIRECTORY``).
:func:`read_offline_run` reads such a folder back into metric series and fields, so runs
recorded that way stay usable without Neptune. Nothing here talks to the ``neptune-scale``
client of Neptune 3.x. For a self-hostable tracker most teams moved to, see
:class:`~zae_trainer.addons.mlflow_logger.MLflowLoggerAddon`.

What it logs (as every logger, see :mod:`zae_trainer.addons._logging_common`): ``config/*`` at
``RUN_BEGIN``; step metrics and learning rate(s) as series appended with
``step=progress_checker.step``; epoch metrics as ``epoch/<name>`` plus ``epoch/index``;
``summary/*`` at ``RUN_END`` (``summary/status`` is ``finished``, ``stopped``, ``failed`` or
``interrupted``); ``sys/failed = True`` when the run raised or SIGINT/SIGTERM interrupted it.
Non-finite values are skipped (Neptune 1.x rejects them, with a warning per value).

``trainer.test()`` results are single values, assigned (not appended): ``test/<name>``
(``test/loss``), ``test/step`` (the trainer's step), ``test/weights`` (``"best"``, ``"last"``, a
path, or ``"current"``) and ``test/checkpoint`` (the file the weights came from, ``""`` when
none was loaded); a later call replaces them. Called after ``run()`` stopped its run, the add-on
opens the same run again (offline: the same ``custom_run_id``, a new folder that ``neptune
sync`` merges; with a server: ``with_id``, not run against a server here), assigns the results
and stops it (``sys/failed``, set when training failed, stays); called before any ``run()``, it
starts a run for them.

Resuming (``resume_run=True``): Neptune accepts only increasing steps in a series, so after a
crash the server would reject the replay of every step the dead process logged past its last
checkpoint. Offline, each process also writes ``zae_trainer/custom_run_id``; a resumed process
reads the earlier folders of its run, and rewinds each series that went past the restored
step (assigns it anew: cleared, then the points up to that step again), so ``neptune sync`` of the folders
in order leaves each step once, with the replayed values (:func:`merge_offline_runs` computes
that result). With a server (``with_id``) nothing is rewound: the replayed steps the dead
process had already logged are rejected by the server and its values stay; this was not run
against a server here. Every log point is flushed to disk (``run.wait(disk_only=True)``, a
file flush), so a killed process keeps what it logged.

Why it does not stall: in Neptune's default ``async`` mode and in ``offline`` mode, appends go
to a local disk queue that a background thread uploads. ``neptune.init_run`` contacts the
server and, with the server unreachable, retries for about a minute, so it runs in a helper
thread for at most ``init_timeout`` seconds; after that the run falls back to offline mode
(one warning), and the abandoned attempt stops its run if it ever completes. ``run.stop`` at
``RUN_END`` waits at most ``init_timeout`` seconds for the queue; what is left stays on disk
for ``neptune sync``.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any, Callable

from ._logging_common import (
    LoggerAddOn,
    LoggingBackendWarning,
    best_checkpoint_path,
    call_with_timeout,
    check_web_logger,
    epoch_record,
    is_finite_number,
    run_config,
    test_record,
)

__all__ = ["NeptuneLoggerAddon", "read_offline_run", "offline_run_folders", "merge_offline_runs",
           "LoggingBackendWarning", "RUN_KEY_FIELD"]

#: The field each offline process writes with the run's ``custom_run_id`` (Neptune's offline
#: folders do not record it), so a resumed process can find the folders of its run.
RUN_KEY_FIELD = "zae_trainer/custom_run_id"

_log = logging.getLogger("zae_trainer")

#: zae-engine's spellings in ``web_logger["neptune"]`` -> ``neptune.init_run`` arguments.
_ZAE_ENGINE_ALIASES = {"project_name": "project", "api_tkn": "api_token"}


class NeptuneLoggerAddon(LoggerAddOn):
    """Log to Neptune (``neptune`` 1.x): a self-hosted server, or offline to disk.

    Parameters
    ----------
    web_logger : dict or None
        zae-engine's setting: ``{"neptune": {...neptune.init_run keyword arguments...}}``
        (zae-engine's ``project_name`` / ``api_tkn`` are accepted). Shared with
        :class:`~zae_trainer.addons.wandb_logger.WandBLoggerAddon`, which reads ``"wandb"``.
        Given without a ``"neptune"`` key (and no ``**init_kwargs``), this add-on stays off.
    resume_run : bool
        When training resumes from a checkpoint (or ``run()`` is called again), continue the
        Neptune run recorded in the checkpoint: ``with_id=<sys/id>`` with a server, and the
        same ``custom_run_id`` offline (``neptune sync`` then merges them).
    upload_best_checkpoint : bool
        At the end of the run, upload the state manager's best checkpoint to
        ``checkpoints/best``. Needs ``StateManagerAddon``.
    init_timeout : float
        Seconds ``neptune.init_run`` (and ``run.stop``) may wait for the server.
    offline_fallback : bool
        If Neptune cannot start, log offline (True) or run without Neptune (False).
    **init_kwargs
        ``neptune.init_run`` keyword arguments for a configured instance
        (``NeptuneLoggerAddon(project="ws/p", mode="offline")``); they override ``web_logger``.

    Examples
    --------
    >>> Trainer.add_on(NeptuneLoggerAddon(mode="offline"))  # doctest: +SKIP
    """

    name = "neptune_logger"
    backend = "Neptune"
    test_needs_session = True

    def __init__(
        self,
        *,
        web_logger: Mapping[str, Any] | None = None,
        resume_run: bool = False,
        upload_best_checkpoint: bool = False,
        init_timeout: float = 30.0,
        offline_fallback: bool = True,
        **init_kwargs: Any,
    ) -> None:
        super().__init__()
        configured = check_web_logger(web_logger, type(self).__name__)
        self.enabled = "neptune" in configured or bool(init_kwargs) or web_logger is None
        options = {_ZAE_ENGINE_ALIASES.get(k, k): v for k, v in configured.get("neptune", {}).items()}
        self.init_kwargs: dict[str, Any] = {**options, **init_kwargs}
        self.resume_run = bool(resume_run)
        self.upload_best_checkpoint = bool(upload_best_checkpoint)
        if not (isinstance(init_timeout, (int, float)) and init_timeout > 0):
            raise ValueError(f"init_timeout must be a number of seconds > 0, got {init_timeout!r}")
        self.init_timeout = float(init_timeout)
        self.offline_fallback = bool(offline_fallback)
        self.run_id: str | None = None  # sys/id of the last run ("OFFLINE-1" offline)
        self.custom_run_id: str | None = None
        self._run: Any = None

    def setup(self, trainer: Any) -> None:
        if self.enabled and importlib.util.find_spec("neptune") is None:
            raise ImportError(
                "NeptuneLoggerAddon needs the 'neptune' package (1.x). To fix, pip install zae_trainer[neptune], "
                "or use LocalLoggerAddon / WandBLoggerAddon instead."
            )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "run_id": self.run_id, "custom_run_id": self.custom_run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.run_id = state.get("run_id")
        self.custom_run_id = state.get("custom_run_id")

    # ==================================================================================
    # LoggerAddOn
    # ==================================================================================
    def _open(self, trainer: Any) -> bool:
        if not self.enabled:
            return False
        import neptune

        kwargs = self._init_arguments()
        mode = kwargs.get("mode") or os.environ.get("NEPTUNE_MODE", "async")
        try:
            if mode in ("offline", "debug", "read-only"):
                run = neptune.init_run(**kwargs)
            else:
                run = _call_with_timeout(lambda: neptune.init_run(**kwargs), self.init_timeout)
        except Exception as exc:
            if not self.offline_fallback or mode == "offline":
                raise
            kwargs.pop("with_id", None)  # offline mode cannot attach to a server-side run
            kwargs["mode"] = mode = "offline"
            run = neptune.init_run(**kwargs)
            self._warn(
                f"Neptune could not start in {mode!r} mode ({type(exc).__name__}: {_first_line(exc)}); logging "
                "offline under .neptune/offline (or $NEPTUNE_DATA_DIRECTORY) instead. To upload it later: "
                "neptune sync"
            )
        self._run = run
        self.run_id = getattr(run, "_sys_id", None)
        self.custom_run_id = kwargs.get("custom_run_id", self.custom_run_id)
        pc = trainer.progress_checker
        if mode == "offline" and self.custom_run_id:
            if self.resume_run and pc.step > 0 and not self._test_session:
                self._rewind_offline(pc.step)
            run[RUN_KEY_FIELD] = self.custom_run_id  # how a later process finds this run's folders
        return True

    def _rewind_offline(self, step: int) -> None:
        """Rewind every series of this run to ``step``, the restored checkpoint's.

        Neptune accepts only increasing steps, so the steps a crashed process logged after its
        last checkpoint would make the server reject their replay. The earlier processes'
        offline folders say what the run holds; a series with points past ``step`` is cleared
        and refilled with its points up to ``step``.
        """
        from neptune.types import FloatSeries

        data_directory = os.environ.get("NEPTUNE_DATA_DIRECTORY", ".neptune")
        earlier = [read_offline_run(f) for f in offline_run_folders(data_directory)]
        mine = [r for r in earlier if r["fields"].get(RUN_KEY_FIELD) == self.custom_run_id]
        for path, points in merge_offline_runs(mine).items():
            if not any(s is not None and s > step for s, _ in points):
                continue
            kept = [(s, v) for s, v in points if s is not None and s <= step]
            # Assigning a series clears it, then logs the values; unlike .clear() it also
            # works for a field only an earlier process created.
            self._run[path] = FloatSeries([v for _, v in kept], steps=[s for s, _ in kept])

    def _write_config(self, config: dict[str, Any]) -> None:
        self._run["config"] = _neptune_values(config)

    def _write_step(self, step: int, record: dict[str, float]) -> None:
        run = self._run
        for key, value in record.items():
            if is_finite_number(value):
                run[key].append(value, step=step)
        run.wait(disk_only=True)  # on disk now (a file flush), so a crash loses nothing already logged

    def _write_epoch(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self._write_step(step, epoch_record(epoch, metrics))

    def _reopen(self, trainer: Any) -> bool:
        fresh = self.run_id is None and self.custom_run_id is None  # test() before any run()
        opened = self._open(trainer)  # the last run again: _init_arguments names it in a test session
        if opened and fresh:
            self._write_config(run_config(trainer))
        return opened

    def _write_test(self, trainer: Any, metrics: dict[str, float]) -> None:
        run = self._run
        for key, value in metrics.items():
            if is_finite_number(value):
                run[key] = value
            else:  # Neptune 1.x stores no NaN/Inf; the text says what it was, not an earlier call's value
                run[key] = repr(value)
        run["test/step"] = trainer.progress_checker.step
        for key, text in test_record(trainer).items():
            run[key] = text
        run.wait(disk_only=True)

    def _write_summary(self, trainer: Any, summary: dict[str, Any]) -> None:
        self._run["summary"] = _neptune_values(summary)
        if self.upload_best_checkpoint:
            path = best_checkpoint_path(trainer)
            if path is None:
                self._warn("Neptune: upload_best_checkpoint=True but no best checkpoint exists (add StateManagerAddon)")
            elif os.path.isdir(path):
                self._run["checkpoints/best"].upload_files(os.path.join(path, "*"))
            else:
                self._run["checkpoints/best"].upload(path)

    def _close(self, outcome: str) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        if outcome in ("failed", "interrupted"):  # Neptune 1.x has one flag for both
            run["sys/failed"] = True
        run.stop(seconds=self.init_timeout)

    def _init_arguments(self) -> dict[str, Any]:
        kwargs = dict(self.init_kwargs)
        if "with_id" in kwargs or "custom_run_id" in kwargs:
            return kwargs
        mode = kwargs.get("mode") or os.environ.get("NEPTUNE_MODE", "async")
        resume = self.resume_run or self._test_session  # a test() after run() writes into the same run
        if resume and self.run_id and mode != "offline" and not self.run_id.startswith("OFFLINE"):
            kwargs["with_id"] = self.run_id
        elif resume and self.custom_run_id:
            kwargs["custom_run_id"] = self.custom_run_id
        else:  # a fresh run gets its own id, so an offline run can be resumed later
            kwargs["custom_run_id"] = uuid.uuid4().hex
        return kwargs


# ======================================================================================
# Reading offline runs back
# ======================================================================================
def offline_run_folders(data_directory: str | os.PathLike[str] = ".neptune") -> list[str]:
    """The offline run folders under a Neptune data directory, oldest first."""
    folders = glob.glob(os.path.join(os.fspath(data_directory), "offline", "run__*"))
    return sorted(folders, key=lambda f: (_created_at(f), f))


def read_offline_run(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What the Neptune client recorded in one offline run folder.

    Returns ``{"series": {path: [(step, value), ...]}, "fields": {path: value},
    "files": {path: local file path}, "cleared": [path, ...]}``; paths are joined with ``/``
    (``"train/loss"``). A series cleared in this folder starts over there and is listed in
    ``cleared``. Reads the client's operation queue (``data-<n>.log``: one JSON operation
    per line).
    """
    series: dict[str, list[tuple[float | None, Any]]] = {}
    fields: dict[str, Any] = {}
    files: dict[str, Any] = {}
    cleared: list[str] = []
    logs = glob.glob(os.path.join(os.fspath(folder), "data-*.log"))
    for log in sorted(logs, key=lambda p: int(os.path.basename(p)[5:-4] or 0)):
        with open(log, encoding="utf-8") as fh:
            for line in fh:
                try:
                    op = json.loads(line)["obj"]
                except (ValueError, KeyError):
                    continue  # a torn last line
                path = "/".join(op.get("path", []))
                kind = op.get("type", "")
                if kind.startswith("Log"):
                    series.setdefault(path, []).extend((v.get("step"), v.get("value")) for v in op.get("values", []))
                elif kind.startswith("Assign"):
                    fields[path] = op.get("value")
                elif kind.startswith("Upload"):
                    files[path] = op.get("file_path", op.get("file_globs"))
                elif kind.startswith("Clear"):
                    series[path] = []
                    cleared.append(path)
    return {"series": series, "fields": fields, "files": files, "cleared": cleared}


def merge_offline_runs(runs: list[dict[str, Any]]) -> dict[str, list[tuple[Any, Any]]]:
    """The series a Neptune server holds after ``neptune sync`` of these offline runs, in order.

    ``runs`` are :func:`read_offline_run` results of one run's processes, oldest first. A
    series cleared by a later process starts over; a point whose step is not above the
    series' last step is dropped, as the server rejects it.
    """
    merged: dict[str, list[tuple[Any, Any]]] = {}
    for run in runs:
        for path in run.get("cleared", []):
            merged[path] = []
        for path, points in run["series"].items():
            series = merged.setdefault(path, [])
            for step, value in points:
                if step is None or not series or series[-1][0] is None or step > series[-1][0]:
                    series.append((step, value))
    return merged


# ======================================================================================
# Helpers
# ======================================================================================
def _call_with_timeout(factory: Callable[[], Any], timeout: float) -> Any:
    """``neptune.init_run`` in a helper thread; TimeoutError after ``timeout`` seconds.

    If the abandoned call completes later, the run it created is stopped there, so nothing
    logs into it.
    """
    return call_with_timeout(factory, timeout, "neptune.init_run", cleanup=lambda run: run.stop(seconds=0))


def _neptune_values(data: Mapping[str, Any]) -> dict[str, Any]:
    """Nested plain data as Neptune 1.x accepts it: no None, lists as strings."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            nested = _neptune_values(value)
            if nested:
                out[str(key)] = nested
        elif isinstance(value, float) and not is_finite_number(value):
            out[str(key)] = repr(value)
        elif isinstance(value, (bool, int, float, str)):
            out[str(key)] = value
        else:
            out[str(key)] = str(value)
    return out


def _created_at(folder: str) -> str:
    try:
        with open(os.path.join(folder, "metadata.json"), encoding="utf-8") as fh:
            return str(json.load(fh).get("createdAt", ""))
    except (OSError, ValueError):
        return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
