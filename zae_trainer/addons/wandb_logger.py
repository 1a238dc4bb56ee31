"""WandBLoggerAddon: Weights & Biases experiment tracking that never stalls or kills a run.

What it logs (see :mod:`zae_trainer.addons._logging_common`): the run configuration at
``RUN_BEGIN`` (as ``wandb.config``), step metrics and learning rate(s) at each log point, epoch
metrics as ``epoch/<name>`` plus ``epoch/index`` at each epoch end, and the summary
(``status``, ``epochs``, ``steps``, ``seconds``, ``stop_reason``, ``best/metric``,
``best/value``, ``best/epoch``) in ``run.summary``. Every value goes to W&B with
``step=progress_checker.step``, so a resumed run continues on the same axis.

Why it does not stall: ``run.log`` hands the row to W&B's background service and returns;
values arrive as Python floats the core read once per log interval. Only ``wandb.init`` at
``RUN_BEGIN`` waits, at most ``init_timeout`` seconds, and ``run.finish`` at ``RUN_END`` (which
waits for uploads still queued).

Faults: when W&B cannot start online (no network, bad key, server unreachable), the run logs
offline into ``wandb/offline-run-*`` (upload later with ``wandb sync``), with one warning
(``offline_fallback=False``: it runs without W&B instead). A W&B call raising mid-run
disables the add-on for the run with one warning; training finishes. A run that raised is
finished with ``exit_code=1`` (shown as failed).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

from ._logging_common import (
    LoggerAddOn,
    LoggingBackendWarning,
    best_checkpoint_path,
    check_web_logger,
    epoch_record,
    run_config,
)

__all__ = ["WandBLoggerAddon", "LoggingBackendWarning"]


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
    """

    name = "wandb"
    backend = "W&B"

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
        self._our_config: dict[str, Any] = {}

    def setup(self, trainer: Any) -> None:
        if self.enabled and importlib.util.find_spec("wandb") is None:
            raise ImportError(
                "WandBLoggerAddon needs the 'wandb' package. To fix, pip install zae_trainer[wandb], or remove "
                "the add-on (LocalLoggerAddon logs to files without an account)."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")

    # ==================================================================================
    # LoggerAddOn
    # ==================================================================================
    def _open(self, trainer: Any) -> bool:
        if not self.enabled:
            return False
        import wandb

        kwargs = self._init_arguments(trainer, wandb)
        try:
            run = wandb.init(**kwargs)
        except Exception as exc:
            if not self.offline_fallback or kwargs.get("mode") in ("offline", "disabled"):
                raise
            kwargs["mode"] = "offline"
            run = wandb.init(**kwargs)
            self._warn(
                f"W&B could not start online ({type(exc).__name__}: {_first_line(exc)}); logging offline to "
                f"{os.path.dirname(run.dir)} instead. To upload it later: wandb sync {os.path.dirname(run.dir)}"
            )
        self._run = run
        self.run_id = run.id
        self.run_dir = os.path.dirname(run.dir)
        if "config" in kwargs and not isinstance(kwargs["config"], Mapping):  # a Namespace etc.: ours on top
            run.config.update(self._our_config, allow_val_change=True)  # type: ignore[no-untyped-call]
        return True

    def _write_step(self, step: int, record: dict[str, float]) -> None:
        self._run.log(record, step=step)

    def _write_epoch(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self._run.log(epoch_record(epoch, metrics), step=step)

    def _write_summary(self, trainer: Any, summary: dict[str, Any]) -> None:
        self._run.summary.update({k: v for k, v in summary.items() if v is not None})
        if self.upload_best_checkpoint:
            self._upload_best(trainer)

    def _close(self, failed: bool) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.finish(exit_code=1 if failed else 0)

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
        if _version(wandb.__version__) >= (0, 19, 10):  # never log into, or finish, a run the user opened
            kwargs.setdefault("reinit", "create_new")
        if self.resume_run and self.run_id and "id" not in kwargs:
            kwargs["id"] = self.run_id
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
