"""MLflowLoggerAddon: MLflow tracking (``mlflow-skinny`` is enough), local or on any server.

Where it logs: ``tracking_uri`` when given (``http://mlflow.internal:5000``,
``sqlite:///mlflow.db``, ``databricks``, a folder), else ``$MLFLOW_TRACKING_URI``, else a
local ``./mlruns`` folder (MLflow's file store). MLflow 3 keeps the file store in maintenance
mode behind ``MLFLOW_ALLOW_FILE_STORE``; when the store is a folder the add-on sets that
variable for the process at run start (``setdefault``: a value you set wins). The sqlite store needs
``sqlalchemy`` and ``alembic`` (the full ``mlflow`` package has them; ``mlflow-skinny`` does
not). ``mlflow ui --backend-store-uri ./mlruns`` shows the runs.

What it logs (as every logger, see :mod:`zae_trainer.addons._logging_common`):

* parameters: the run configuration flattened with ``.`` (``lr``,
  ``zae_trainer.optimizer.lr``; not ``/``, which MLflow's file store turns into folders, so a
  key could not be both a value and a prefix), credentials redacted, values as strings cut
  to MLflow's 6000 characters;
* step metrics and learning rate(s) at each log point with ``step=progress_checker.step``;
  epoch metrics as ``epoch/<name>`` plus ``epoch/index`` (1-based), also at the trainer's step;
* the summary: numbers as metrics ``summary/<key>`` (``summary/best/value``), the rest
  (``status``, ``best/metric``, ``stop_reason``) as tags ``summary/<key>``;
* the state manager's best checkpoint as an artifact under ``checkpoints/best`` (a
  ``StateManagerAddon`` must be present; ``upload_best_checkpoint=None``, the default, uploads
  it whenever one is);
* the run's status: ``FINISHED``, ``FAILED`` (the run raised) or ``KILLED`` (SIGINT/SIGTERM);
* ``trainer.test()`` results: metrics ``test/<name>`` at the trainer's step, and tags
  ``test/weights`` (``"best"``, ``"last"``, a path, or ``"current"``) and ``test/checkpoint``
  (the file the weights came from, ``""`` when none was loaded). MLflow keeps every value of a
  metric, so several calls (best, then last weights) are all in ``get_metric_history``, each
  with a later timestamp; the run shows the latest. After ``run()`` ended, they go to the same
  run through the client (MLflow accepts values for a finished run); its status and end time
  stay as training left them. Before any ``run()``, a run is created for them.

The run is the user's if there is one: with an active fluent run (``mlflow.start_run()`` before
training) the add-on logs into it and leaves it open. Otherwise it creates a run through an
``MlflowClient`` and changes no global MLflow state (no ``set_tracking_uri``, no active run);
log your own values with ``addon.client`` and ``addon.run_id``.

Resuming: with ``resume_run=True`` a run restored from a checkpoint continues the MLflow run
the checkpoint names (status back to ``RUNNING``). MLflow keeps every value of a metric, steps
in any order, so rows a crashed process logged after its last checkpoint stay and the
replayed steps are added beside them (``get_metric_history`` returns both); nothing is
dropped. Parameters cannot change in MLflow: on resume, parameters whose value changed (a new
``resume`` path, say) keep their first value.

Why it does not stall: metrics go through MLflow's asynchronous logging
(``log_batch(..., synchronous=False)``), a queue a background thread drains, so a slow server
never holds a step. Creating the run and the final wait for the queue each take at most
``timeout`` seconds; past that the add-on gives up with one warning (what is queued may be
lost) and training goes on. Like every logger, a failing MLflow call disables the add-on for
the run with one warning and never stops training. A local folder (MLflow's file store) is
written synchronously instead: a disk append does not stall, and the file store is not safe for
the queue's parallel writers (two batches creating the same metric folder at once fail with
``File exists`` and lose their values).

Why it sets ``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER=0`` (``setdefault``: a value you set wins):
MLflow's HTTP retries add a jitter drawn from Python's global :mod:`random`, in MLflow's own
threads. A server that is slow or down would then draw from the generator your training
seeded, at moments nobody controls, and a seeded run (or an exact resume) would stop being
reproducible. Without jitter the retries draw nothing; they back off all the same.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from ._logging_common import (
    LoggerAddOn,
    LoggingBackendWarning,
    best_checkpoint_path,
    call_with_timeout,
    epoch_record,
    is_finite_number,
    run_config,
    test_record,
)

__all__ = ["MLflowLoggerAddon", "LoggingBackendWarning", "flatten_params"]

_log = logging.getLogger("zae_trainer")

_MAX_KEY = 250
_MAX_VALUE = 6000
_MAX_TAG = 8000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")
_PARAM_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. ]")  # no "/" in parameter names (folders in a file store)
_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class MLflowLoggerAddon(LoggerAddOn):
    """Log to MLflow: parameters, step and epoch metrics, summary, best checkpoint, status.

    Parameters
    ----------
    tracking_uri : str or None
        Where runs go: a server (``http://host:5000``), a database (``sqlite:///mlflow.db``),
        or a folder. ``None``: ``$MLFLOW_TRACKING_URI``, else ``./mlruns``.
    experiment_name : str or None
        The experiment (created if missing). ``None``: ``$MLFLOW_EXPERIMENT_NAME``, else
        MLflow's ``Default`` experiment.
    run_name : str or None
        The run's display name (MLflow picks one when ``None``).
    tags : dict or None
        Tags set on the run (``{"team": "vision"}``).
    resume_run : bool
        When training resumes from a checkpoint (or ``run()`` is called again), continue the
        MLflow run recorded in the checkpoint instead of creating a new one.
    upload_best_checkpoint : bool or None
        Log the state manager's best checkpoint as an artifact at the end of the run.
        ``None`` (default): when a ``StateManagerAddon`` is present. ``True`` warns when
        there is none.
    timeout : float
        Seconds creating the run, and the final wait for queued metrics, may take.

    Examples
    --------
    >>> Trainer.add_on(MLflowLoggerAddon(experiment_name="digits"))  # doctest: +SKIP
    >>> Trainer.add_on("mlflow", "state_manager")(model, optimizer=opt, save_path="ckpt",
    ...     tracking_uri="http://mlflow.internal:5000", experiment_name="digits")  # doctest: +SKIP
    """

    name = "mlflow_logger"
    backend = "MLflow"
    test_needs_session = True

    def __init__(
        self,
        *,
        tracking_uri: str | os.PathLike[str] | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        resume_run: bool = False,
        upload_best_checkpoint: bool | None = None,
        timeout: float = 30.0,
    ) -> None:
        super().__init__()
        self.tracking_uri = os.fspath(tracking_uri) if tracking_uri is not None else None
        if experiment_name is not None and not (isinstance(experiment_name, str) and experiment_name):
            raise ValueError(f"MLflowLoggerAddon: experiment_name must be a non-empty string, got {experiment_name!r}")
        self.experiment_name = experiment_name
        self.run_name = run_name
        if tags is not None and not isinstance(tags, Mapping):
            raise TypeError(f"MLflowLoggerAddon: tags must be a dict such as {{'team': 'vision'}}, got {tags!r}")
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.resume_run = bool(resume_run)
        self.upload_best_checkpoint = upload_best_checkpoint
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"MLflowLoggerAddon: timeout must be a number of seconds > 0, got {timeout!r}")
        self.timeout = float(timeout)
        self.run_id: str | None = None  # the MLflow run logged to last (kept in checkpoints)
        self.client: Any = None  # the MlflowClient of the current run
        self._owns_run = False
        self._pending: list[Any] = []  # RunOperations of queued log_batch calls
        self._test_ms = 0  # timestamp of the last test() results, so each later call's are newer

    def setup(self, trainer: Any) -> None:
        if importlib.util.find_spec("mlflow") is None:
            raise ImportError(
                "MLflowLoggerAddon needs MLflow. To fix, pip install zae_trainer[mlflow] (mlflow-skinny), or "
                "remove the add-on (LocalLoggerAddon logs to files without any service)."
            )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.run_id = state.get("run_id")

    @property
    def owns_run(self) -> bool:
        """Whether the add-on created the current run (and will terminate it)."""
        return self._owns_run

    # ==================================================================================
    # LoggerAddOn
    # ==================================================================================
    def _open(self, trainer: Any) -> bool:
        import mlflow
        from mlflow import MlflowClient

        self._pending = []
        active = mlflow.active_run()
        if active is not None:  # the user's fluent run: log into it, leave it open
            self.client = MlflowClient(mlflow.get_tracking_uri())
            self.run_id, self._owns_run = active.info.run_id, False
            return True
        uri = self._resolve_uri()
        self.client = MlflowClient(uri)
        client = self.client
        self.run_id = call_with_timeout(lambda: self._start_run(trainer), self.timeout, "MLflow run start",
                                        cleanup=lambda run_id: client.set_terminated(run_id, "KILLED"))
        self._owns_run = True
        return True

    def _write_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = flatten_params(config)
        existing = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            _log.info("MLflow: run %s keeps the first value of parameters %s (MLflow parameters cannot change)",
                      self.run_id, changed)
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + _PARAMS_PER_BATCH])

    def _write_step(self, step: int, record: dict[str, float]) -> None:
        self._log_metrics(record, step)

    def _write_epoch(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self._log_metrics(epoch_record(epoch, metrics), step)

    def _write_summary(self, trainer: Any, summary: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._drain()  # the queue first: a file store must not be written from two threads at once
        step = trainer.progress_checker.step
        metrics = self._metrics({f"summary/{k}": v for k, v in summary.items()}, step)
        tags = [RunTag(f"summary/{k}", str(v)[:_MAX_TAG]) for k, v in summary.items()
                if v is not None and not is_finite_number(v)]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        if self.upload_best_checkpoint is not False:
            self._upload_best(trainer)

    def _reopen(self, trainer: Any) -> bool:
        from mlflow import MlflowClient

        if self.run_id is not None:
            if self.client is None:  # a run id restored from a checkpoint, in a new process
                self.client = MlflowClient(self._resolve_uri())
            self.client.get_run(self.run_id)  # raises (one warning) if the store does not have it
            self._owns_run = False  # finished already: its status and end time stay as run() left them
            return True
        opened = self._open(trainer)  # test() before any run(): a new run for the results
        if opened:
            self._write_config(run_config(trainer))
        return opened

    def _write_test(self, trainer: Any, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        self._drain()  # a file store must not be written from two threads at once
        self._test_ms = max(int(time.time() * 1000), self._test_ms + 1)
        step = trainer.progress_checker.step
        values = [Metric(_key(k), float(v), self._test_ms, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=values, tags=_tags(test_record(trainer)))

    def _close(self, outcome: str) -> None:
        client, run_id = self.client, self.run_id
        if client is None or run_id is None:
            return
        self._drain()
        if self._owns_run:
            client.set_terminated(run_id, _STATUS.get(outcome, "FINISHED"))

    # ==================================================================================
    # Details
    # ==================================================================================
    def _resolve_uri(self) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")  # see the module docstring
        if "://" not in uri and not uri.startswith(("file:", "databricks")):  # a folder
            uri = "file:" + os.path.abspath(uri)
        if uri.startswith("file:"):  # MLflow 3 refuses its file store unless this is set
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return uri

    def _start_run(self, trainer: Any) -> str:
        client = self.client
        pc = trainer.progress_checker
        resuming = self.resume_run and self.run_id is not None and (pc.step > 0 or pc.epoch > 0)
        if resuming:
            try:
                client.get_run(self.run_id)
            except Exception as exc:  # not in this store: a new run, said once
                _log.info("MLflow: run %s to resume is not in %s (%s); starting a new run",
                          self.run_id, client.tracking_uri, exc)
            else:
                client.update_run(self.run_id, status="RUNNING")
                if self.tags:
                    client.log_batch(self.run_id, tags=_tags(self.tags))
                return str(self.run_id)
        name = self.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if name:
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
        else:
            experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "0")
        run = client.create_run(experiment_id, tags=dict(self.tags), run_name=self.run_name)
        return str(run.info.run_id)

    def _drain(self) -> None:
        """Wait (at most ``timeout`` seconds) for the queued metrics to be written."""
        pending, self._pending = self._pending, []
        if pending:
            call_with_timeout(lambda: [op.wait() for op in pending], self.timeout, "MLflow's metric queue")

    @staticmethod
    def _metrics(values: Mapping[str, Any], step: int) -> list[Any]:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(_key(k), float(v), now, step) for k, v in values.items() if is_finite_number(v)]

    def _log_metrics(self, values: Mapping[str, Any], step: int) -> None:
        metrics = self._metrics(values, step)
        uri = str(self.client.tracking_uri)
        local = uri.startswith("file:") or "://" not in uri  # the file store: see the module docstring
        for i in range(0, len(metrics), _METRICS_PER_BATCH):
            operation = self.client.log_batch(self.run_id, metrics=metrics[i:i + _METRICS_PER_BATCH],
                                              synchronous=local)
            if operation is not None:
                self._pending.append(operation)

    def _upload_best(self, trainer: Any) -> None:
        path = best_checkpoint_path(trainer)
        if path is None:
            if self.upload_best_checkpoint:
                self._warn("MLflow: upload_best_checkpoint=True but no best checkpoint exists "
                           "(is StateManagerAddon added, with a monitored metric?)")
            return
        if os.path.isdir(path):
            self.client.log_artifacts(self.run_id, path, artifact_path=f"checkpoints/best/{os.path.basename(path)}")
        else:
            self.client.log_artifact(self.run_id, path, artifact_path="checkpoints/best")


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested configuration as MLflow parameters: ``{"a.b": "1"}``, keys and values within MLflow's limits.

    Examples
    --------
    >>> flatten_params({"lr": 0.1, "optimizer": {"class": "SGD", "betas": [0.9, 0.99]}, "note": None})
    {'lr': '0.1', 'optimizer.class': 'SGD', 'optimizer.betas': '[0.9, 0.99]', 'note': 'None'}
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name + "."))
        else:
            flat[_PARAM_UNSAFE.sub("_", name)[:_MAX_KEY]] = str(value)[:_MAX_VALUE]
    return flat


def _key(name: str) -> str:
    return _KEY_UNSAFE.sub("_", name)[:_MAX_KEY]


def _tags(tags: Mapping[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, v[:_MAX_TAG]) for k, v in tags.items()]
