"""zae-engine's ``WandBLoggerAddon`` and ``NeptuneLoggerAddon``: per-batch web logging.

Configured as in zae-engine, by one ``web_logger`` dict shared by both::

    web_logger={"wandb": {"project": "p"}, "neptune": {"project_name": "ws/p", "api_tkn": "..."}}

Each add-on opens its run when the trainer is built (``trainer.web_logger["wandb"]`` /
``["neptune"]``, each with zae-engine's ``is_live()``), logs every batch's scalar outputs
from :meth:`~zae_trainer.compat.Trainer.logging` (training and validation, under the step's
own keys: ``loss``, ``acc``), and finishes the run when the trainer is freed: at ``del trainer``
(or when its last reference goes), since nothing in a trainer forms a reference cycle.

Fixed from zae-engine: both add-ons receive ``web_logger`` (zae-engine's popped it, so with
both installed only one started, and W&B then logged into Neptune's run); the dict you pass
is not modified; a failing logging call warns once and turns that logger off instead of
stopping training; no ``__del__`` (a ``weakref.finalize`` finishes the run).

Cost: one ``.item()`` per scalar value per batch, that is a device synchronisation per batch
on a GPU, as in zae-engine. For logging without per-step synchronisation use the core's
:class:`zae_trainer.addons.WandBLoggerAddon` / ``NeptuneLoggerAddon``.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from ...addon import AddOn

__all__ = ["WandBLoggerAddon", "NeptuneLoggerAddon"]


class _WebLogger(AddOn):
    """Shared part: the run's life and the per-batch call."""

    key = ""  # "wandb" / "neptune": its entry in web_logger

    def __init__(self, *, web_logger: Mapping[str, Any] | None = None) -> None:
        if web_logger is not None and not isinstance(web_logger, Mapping):
            raise TypeError(
                f"web_logger must be a dict such as {{'{self.key}': {{...}}}}, got {type(web_logger).__name__}"
            )
        self.params: dict[str, Any] | None = (
            dict(web_logger[self.key]) if web_logger and self.key in web_logger else None
        )
        self.run: Any = None

    def setup(self, trainer: Any) -> None:
        if self.params is None or not trainer.is_main_process:
            return
        self.run = self.open(dict(self.params))
        trainer.web_logger[self.key] = self.run
        weakref.finalize(trainer, _finish, self.key, self.run).atexit = False

    def open(self, params: dict[str, Any]) -> Any:
        raise NotImplementedError

    def write(self, values: dict[str, float]) -> None:
        raise NotImplementedError

    def log_step(self, step_dict: Mapping[str, Any]) -> None:
        """Called by ``Trainer.logging`` once per batch: log the scalar values."""
        if self.run is None:
            return
        values = {}
        for key, value in step_dict.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue  # "output" and other non-scalars: zae-engine's .item() would fail
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = value
        if not values:
            return
        try:
            self.write(values)
        except Exception as exc:  # a logger never stops training
            warnings.warn(
                f"{type(self).__name__}: logging failed ({type(exc).__name__}: {exc}); it is off for the rest of "
                "this trainer's life, training continues.",
                RuntimeWarning,
                stacklevel=3,
            )
            self.run = None


def _finish(key: str, run: Any) -> None:
    try:
        if key == "wandb":
            run.finish()
        else:
            run.stop()
    except Exception as exc:  # at collection time there is no caller to raise to
        warnings.warn(f"finishing the {key} run failed: {exc}", RuntimeWarning, stacklevel=1)


class WandBLoggerAddon(_WebLogger):
    """Log every batch to Weights & Biases; ``web_logger={"wandb": {...wandb.init kwargs}}``."""

    name = "zae_engine_wandb"
    key = "wandb"

    def open(self, params: dict[str, Any]) -> Any:
        return self.init_wandb(params)

    def init_wandb(self, params: dict[str, Any]) -> Any:
        """``wandb.init(**params)``, in a run of its own (a run the user opened is left alone)."""
        import wandb

        params.setdefault("reinit", "create_new")
        return _LiveRun(wandb.init(**params))

    def write(self, values: dict[str, float]) -> None:
        self.run.log(values)


class _LiveRun:
    """A W&B run with zae-engine's ``is_live()`` (W&B runs refuse new attributes).

    Everything else is the run's own: ``trainer.web_logger["wandb"].log(...)``, ``.summary``,
    ``.finish()``; the run object itself is ``.run``.
    """

    __slots__ = ("run",)

    def __init__(self, run: Any) -> None:
        object.__setattr__(self, "run", run)

    def is_live(self) -> bool:
        return not getattr(self.run, "_is_finished", False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.run, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.run, name, value)

    def __repr__(self) -> str:
        return f"<zae-engine W&B run {self.run!r}>"


class NeptuneLoggerAddon(_WebLogger):
    """Log every batch to Neptune; ``web_logger={"neptune": {"project_name": ..., "api_tkn": ...}}``.

    Other keys of the ``"neptune"`` dict are passed to ``neptune.init_run``.
    """

    name = "zae_engine_neptune"
    key = "neptune"

    def open(self, params: dict[str, Any]) -> Any:
        return self.init_neptune(params)

    def init_neptune(self, params: dict[str, Any]) -> Any:
        """``neptune.init_run(project=project_name, api_token=api_tkn, **rest)``."""
        import neptune

        project = params.pop("project_name", None)
        token = params.pop("api_tkn", None)
        run = neptune.init_run(project=project, api_token=token, **params)
        self.add_state_checker(run)
        return run

    @staticmethod
    def add_state_checker(*objects: Any) -> None:
        """Give each Neptune object zae-engine's ``is_live()``."""
        for obj in objects:
            obj.is_live = functools.partial(lambda o: o._state.value != "stopped", obj)

    def write(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.run[key].log(value)
