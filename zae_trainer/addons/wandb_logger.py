"""WandBLoggerAddon: Weights & Biases experiment tracking that never stalls or kills a run.

What it logs (see :mod:`zae_trainer.addons._logging_common`): the run configuration at
``RUN_BEGIN`` (as ``wandb.config``), step metrics and learning rate(s) at each log point, epoch
metrics as ``epoch/<name>`` plus ``epoch/index`` (1-based) at each epoch end, and the summary
(``status``, ``epochs``, ``steps``, ``samples``, ``seconds``, ``process_seconds``,
``stop_reason``, ``best/metric``, ``best/value``, ``best/epoch``) in ``run.summary``.

``trainer.test()`` results go where W&B users look for final numbers, the run's summary:
``test/<name>`` (``test/loss``), ``test/weights`` (``"best"``, ``"last"``, a path, or
``"current"`` for the model as it was) and ``test/checkpoint`` (the file the weights came from,
``""`` when none was loaded). Each call is also a history row at ``trainer/step`` (as
Lightning's W&B logger does), so two calls (best, then last weights) both stay in the history
while the summary holds the latest. Called after ``run()`` finished its run, the add-on resumes
that same run (``id=<run_id>, resume="allow"``; offline, a new ``offline-run-*`` folder of the
same id, which ``wandb sync`` merges), writes, and finishes it again with the exit code training
had; called before any ``run()``, it starts a run for the results.

The run is the user's if there is one. When ``wandb.run`` is set (the user called
``wandb.init()`` before training), the add-on logs into that run, adds its configuration
without overriding the user's keys, and never finishes it. Otherwise it starts a run and makes
it the global one, so ``wandb.log(...)``, ``wandb.watch(model)`` and friends work inside
``train_step``; it finishes that run at ``RUN_END``. Either way the run is public as
``trainer.get_addon("wandb_logger").run`` (Lightning's ``logger.experiment``), for images,
tables and histograms.

The x-axis is declared, not implied. Every row carries ``trainer/step`` (optimizer steps
completed) and each metric is declared with ``run.define_metric(name,
step_metric="trainer/step")``; epoch metrics with ``step_metric="epoch/index"``. Rows are
logged without ``step=``, so W&B's own row counter only grows. Why: a process killed after it
logged past its last checkpoint leaves W&B's step ahead of the checkpoint, and W&B drops every
row logged with an explicit ``step=`` below its current one, so a resumed run would lose the
replayed rows; with a declared step metric they are accepted and plotted at their step. In a
run this add-on started, ``define_metric("*", step_metric="trainer/step", step_sync=True)``
also puts your own ``wandb.log`` values on the trainer's step.

Why it does not stall: ``run.log`` hands the row to W&B's background service and returns;
values arrive as Python floats the core read once per log interval. Only ``wandb.init`` at
``RUN_BEGIN`` waits, at most ``init_timeout`` seconds, and ``run.finish`` at ``RUN_END`` (which
waits for uploads still queued).

Faults and outcomes: when W&B cannot start online (no network, bad key, server unreachable),
the run logs offline into ``wandb/offline-run-*`` (upload later with ``wandb sync``), with one
warning (``offline_fallback=False``: it runs without W&B instead). A W&B call raising mid-run
disables the add-on for the run with one warning; training finishes. A run this add-on started
is finished with ``exit_code=0`` when training finished, ``1`` when it raised, and ``130`` /
``143`` (``128 + signal``) when SIGINT / SIGTERM interrupted it, so W&B shows it as failed
rather than successful.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from ._logging_common import (
    LoggerAddOn,
    LoggingBackendWarning,
    best_checkpoint_path,
    check_web_logger,
    epoch_record,
    run_config,
    test_record,
)

__all__ = ["WandBLoggerAddon", "LoggingBackendWarning", "STEP_METRIC", "EPOCH_METRIC"]

_log = logging.getLogger("zae_trainer")

#: The declared x-axis of step metrics: optimizer steps completed.
STEP_METRIC = "trainer/step"
#: The declared x-axis of epoch metrics (``epoch/<name>``): the 1-based epoch number.
EPOCH_METRIC = "epoch/index"


class WandBLoggerAddon(LoggerAddOn):
    """Log to Weights & Biases (``wandb``), online or offline.

    Parameters
    ----------
    web_logger : dict or None
        zae-engine's setting: ``{"wandb": {...wandb.init keyword arguments...}}``. Shared
        with :class:`~zae_trainer.addons.neptune_logger.NeptuneLoggerAddon`, which reads its
        own ``"neptune"`` key, so one dict configures both. Given without a ``"wandb"`` key
        (and no ``**init_kwargs``), this add-on stays off, as in zae-engine.
    resume_run : bool
        When training resumes from a checkpoint (or ``run()`` is called again), continue the
        W&B run recorded in the checkpoint (``id=<saved>, resume="allow"``) instead of
        starting a new one. An ``id`` you pass yourself wins.
    upload_best_checkpoint : bool
        At the end of the run, log the state manager's best checkpoint as a ``model``
        artifact (aliases ``best``, ``latest``). Needs ``StateManagerAddon``.
    init_timeout : float
        Seconds ``wandb.init`` may wait for the server before the offline fallback.
    offline_fallback : bool
        If W&B cannot start online, log offline (True) or run without W&B (False).
    **init_kwargs
        ``wandb.init`` keyword arguments for a configured instance
        (``WandBLoggerAddon(project="p", mode="offline")``); they override ``web_logger``.

    Examples
    --------
    >>> Trainer.add_on(WandBLoggerAddon)(model, optimizer=opt,
    ...     web_logger={"wandb": {"project": "digits", "mode": "offline"}})  # doctest: +SKIP
    >>> Trainer.add_on(WandBLoggerAddon(project="digits", tags=["baseline"]))  # doctest: +SKIP

    Your own logging inside a step goes to the same run::

        def train_step(self, batch):
            ...
            if self.progress_checker.step % 100 == 0:
                wandb.log({"samples": wandb.Image(batch[0][0])})  # or self.get_addon("wandb_logger").run.log
    """

    name = "wandb_logger"
    backend = "W&B"
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
        self.enabled = "wandb" in configured or bool(init_kwargs) or web_logger is None
        self.init_kwargs: dict[str, Any] = {**configured.get("wandb", {}), **init_kwargs}
        self.resume_run = bool(resume_run)
        self.upload_best_checkpoint = bool(upload_best_checkpoint)
        if not (isinstance(init_timeout, (int, float)) and init_timeout > 0):
            raise ValueError(f"init_timeout must be a number of seconds > 0, got {init_timeout!r}")
        self.init_timeout = float(init_timeout)
        self.offline_fallback = bool(offline_fallback)
        self.run_id: str | None = None  # the W&B run this add-on logged to last (kept in checkpoints)
        self.run_dir: str | None = None  # its local folder (…/wandb/<offline-|>run-<time>-<id>)
        self._run: Any = None
        self._owns_run = False  # False: the user's run, which this add-on never finishes
        self._defined: set[str] = set()  # metrics already given their x-axis in this run
        self._our_config: dict[str, Any] = {}

    @property
    def run(self) -> Any:
        """The ``wandb`` Run being logged to while ``run()`` trains (None before and after).

        The user's own run when ``wandb.init()`` was called before training, else the one this
        add-on started (then also ``wandb.run``). Log media, tables, histograms or
        ``run.watch(model)`` with it.
        """
        return self._run

    @property
    def owns_run(self) -> bool:
        """Whether the add-on started the current run (and will finish it)."""
        return self._owns_run

    def setup(self, trainer: Any) -> None:
        if self.enabled and importlib.util.find_spec("wandb") is None:
            raise ImportError(
                "WandBLoggerAddon needs the 'wandb' package. To fix, pip install zae_trainer[wandb], or remove "
                "the add-on (LocalLoggerAddon logs to files without an account)."
            )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.run_id = state.get("run_id")

    # ==================================================================================
    # LoggerAddOn
    # ==================================================================================
    def _open(self, trainer: Any) -> bool:
        if not self.enabled:
            return False
        import wandb

        self._defined = set()
        active = wandb.run
        if active is not None:  # the user's run: log into it, never finish it
            if self.init_kwargs:
                _log.info("W&B: logging into the active run %s; wandb.init options %s are not used",
                          active.id, sorted(self.init_kwargs))
            active.config.setdefaults(run_config(trainer))  # type: ignore[no-untyped-call]
            self._adopt(active, owned=False)
            return True

        kwargs = self._init_arguments(trainer, wandb)
        try:
            run = self._init(wandb, kwargs)
        except Exception as exc:
            if not self.offline_fallback or kwargs.get("mode") in ("offline", "disabled"):
                raise
            kwargs["mode"] = "offline"
            run = self._init(wandb, kwargs)
            self._warn(
                f"W&B could not start online ({type(exc).__name__}: {_first_line(exc)}); logging offline to "
                f"{os.path.dirname(run.dir)} instead. To upload it later: wandb sync {os.path.dirname(run.dir)}"
            )
        # "return_previous" hands back a run someone else started with reinit="create_new":
        # log into it, but it is not ours to finish.
        owned = wandb.run is run or kwargs.get("reinit") == "create_new"
        if "config" in kwargs and not isinstance(kwargs["config"], Mapping):  # a Namespace etc.: ours on top
            run.config.update(self._our_config, allow_val_change=True)  # type: ignore[no-untyped-call]
        self._adopt(run, owned=owned)
        if owned:  # the user's own wandb.log rows in train_step land on the trainer's step too
            run.define_metric(STEP_METRIC)
            run.define_metric("*", step_metric=STEP_METRIC, step_sync=True)
        return True

    def _init(self, wandb: Any, kwargs: dict[str, Any]) -> Any:
        """``wandb.init(**kwargs)``; a resumed run still held by a killed process is freed first.

        Why: W&B's service (``wandb-core``) is shared by a process and the processes it starts
        (through the ``WANDB_SERVICE`` variable they inherit), and it holds each run's stream
        until the process that opened the run finishes it. A process killed by SIGKILL or the
        OOM killer never does, so a resume of its run through the same service (the launcher
        or notebook that started it, or its next child) fails with "run ID ... is in use", and
        the killed process's last rows stay in the service's memory, not in its run folder.
        Finishing that stream writes them out and frees the ID; the resumed run then starts.
        A run can only be held by one process at a time, so a process still logging to it would
        lose its W&B run here (it warns and trains on): resume a run only after its process ended.
        """
        try:
            return wandb.init(**kwargs)
        except Exception as exc:
            run_id = kwargs.get("id")
            if not (run_id and kwargs.get("resume") and f"run ID {run_id} is in use" in str(exc)):
                raise
            if not _finish_stream(run_id):
                raise RuntimeError(
                    f"W&B run {run_id} is held by another process through the shared W&B service "
                    f"(WANDB_SERVICE={os.environ.get('WANDB_SERVICE', '')!r}), most likely the one that logged it "
                    "before it was killed, and this wandb version offers no way to free it. To fix, resume it "
                    "from a process that does not inherit WANDB_SERVICE (unset it), or upgrade wandb (>= 0.31)."
                ) from exc
            _log.warning("W&B: run %s was still held by a process that ended without finishing it (killed?); "
                         "finished its stream (its rows are now on disk) to resume the run here", run_id)
        deadline = time.monotonic() + self.init_timeout
        while True:  # the service frees the stream asynchronously
            try:
                return wandb.init(**kwargs)
            except Exception as exc:
                if "is in use" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _adopt(self, run: Any, owned: bool) -> None:
        self._run = run
        self._owns_run = owned
        self.run_id = run.id
        self.run_dir = os.path.dirname(run.dir)

    def _write_step(self, step: int, record: dict[str, float]) -> None:
        self._declare(record, STEP_METRIC)
        self._run.log({**record, STEP_METRIC: step})

    def _write_epoch(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        record = epoch_record(epoch, metrics)
        self._declare({k: v for k, v in record.items() if k != EPOCH_METRIC}, EPOCH_METRIC)
        self._declare({EPOCH_METRIC: epoch}, STEP_METRIC)
        self._run.log({**record, STEP_METRIC: step})

    def _reopen(self, trainer: Any) -> bool:
        # the user's active run if there is one, else this add-on's last run, resumed by id
        # (_init_arguments adds it while the test session is open), else a new one
        return self._open(trainer)

    def _write_test(self, trainer: Any, metrics: dict[str, float]) -> None:
        self._declare(metrics, STEP_METRIC)
        self._run.log({**metrics, STEP_METRIC: trainer.progress_checker.step})
        self._run.summary.update({**metrics, **test_record(trainer)})

    def _declare(self, record: Mapping[str, Any], axis: str) -> None:
        """Give each metric not seen yet in this run its x-axis (once per name)."""
        for key in record:
            if key not in self._defined:
                self._run.define_metric(key, step_metric=axis)
                self._defined.add(key)

    def _write_summary(self, trainer: Any, summary: dict[str, Any]) -> None:
        self._run.summary.update({k: v for k, v in summary.items() if v is not None})
        if self.upload_best_checkpoint:
            self._upload_best(trainer)

    def _close(self, outcome: str) -> None:
        run, self._run = self._run, None
        if run is None or not self._owns_run:  # the user's run stays open for the user
            return
        if outcome == "failed":
            exit_code = 1
        elif outcome == "interrupted":
            exit_code = 128 + (self.interrupt_signal or 2)
        else:
            exit_code = 0
        run.finish(exit_code=exit_code)

    # ==================================================================================
    # Details
    # ==================================================================================
    def _init_arguments(self, trainer: Any, wandb: Any) -> dict[str, Any]:
        kwargs = dict(self.init_kwargs)
        self._our_config = run_config(trainer)
        user_config = kwargs.get("config")
        if user_config is None or isinstance(user_config, Mapping):
            kwargs["config"] = {**self._our_config, **dict(user_config or {})}
        settings = kwargs.get("settings")
        if settings is None:
            kwargs["settings"] = wandb.Settings(init_timeout=self.init_timeout)
        elif isinstance(settings, Mapping) and "init_timeout" not in settings:
            kwargs["settings"] = {**settings, "init_timeout": self.init_timeout}
        if _version(wandb.__version__) >= (0, 19, 10):
            # Not "create_new" (it leaves wandb.run unset, so the user's wandb.log would fail),
            # not "finish_previous" (the notebook default, which would finish the user's runs).
            kwargs.setdefault("reinit", "return_previous")
        if self.run_id and "id" not in kwargs and (self.resume_run or self._test_session):
            kwargs["id"] = self.run_id
            kwargs.setdefault("resume", "allow")
        elif self._test_session and kwargs.get("id") == self.run_id:  # your id: the run to resume for test()
            kwargs.setdefault("resume", "allow")
        return kwargs

    def _upload_best(self, trainer: Any) -> None:
        path = best_checkpoint_path(trainer)
        if path is None:
            self._warn("W&B: upload_best_checkpoint=True but no best checkpoint exists (is StateManagerAddon added?)")
            return
        import wandb

        artifact = wandb.Artifact(name=f"model-{self._run.id}", type="model", metadata=_best_metadata(trainer))
        if os.path.isdir(path):
            artifact.add_dir(path)
        else:
            artifact.add_file(path)
        self._run.log_artifact(artifact, aliases=["best", "latest"])


def _best_metadata(trainer: Any) -> dict[str, Any]:
    best = trainer.best
    return {"metric": best.get("metric"), "value": best.get("value"), "epoch": best.get("epoch")}


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _finish_stream(run_id: str) -> bool:
    """Ask this process's W&B service to finish run ``run_id``'s stream; False if wandb has no such call.

    wandb has no public call for it; ``ServiceConnection.inform_finish`` is what ``run.finish``
    sends, tested with wandb 0.31.
    """
    try:
        from wandb.sdk import wandb_setup

        wandb_setup.singleton().ensure_service().inform_finish(run_id=run_id)
    except (ImportError, AttributeError, TypeError) as exc:
        _log.debug("W&B: cannot finish the stream of run %s (%r)", run_id, exc)
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
