"""zae-engine's ``Trainer`` as a subclass of the core :class:`zae_trainer.Trainer`.

Everything zae-engine code calls is here, built on the core's extension points
(:mod:`zae_trainer.contract`): ``record_step`` feeds zae-engine's per-batch ``logging()``,
``phase_end_metrics`` runs ``metric_on_epoch_end()`` and ``print_log()``, and a small
built-in add-on (:class:`ZaeEngineLayer`) does what zae-engine did at epoch end
(``check_better``) and before each optimizer step (``gradient_clip``). The core itself has no
branch for any of it.

Where zae-engine misbehaved the layer keeps the API and fixes the behaviour; each fix is named
in the method's docstring and in ``docs/guides/migrating-from-zae-engine.md``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import torch
from torch import nn

from ..addon import AddOn
from ..contract import Phase
from ..errors import TrainerConfigError
from ..progress import ProgressChecker
from ..trainer import Trainer as CoreTrainer
from ..transfer import DeviceLike, move_to_device

__all__ = ["Trainer", "T", "ProgressChecker", "ZaeEngineLayer"]

T = TypeVar("T", bound="Trainer")

_CPU = torch.device("cpu")
#: batches between moves of a phase's logged scalars to the CPU (one synchronisation each)
_HOST_EVERY = 1024


class ZaeEngineLayer(AddOn):
    """What zae-engine's loop did around the core's steps, as an ordinary add-on.

    * ``BEFORE_OPTIMIZER_STEP``: ``gradient_clip`` (max total L2 norm). It runs after the
      precision mixer has unscaled fp16 gradients, so clipping is kept under mixed precision
      (zae-engine's ``PrecisionMixerAddon`` dropped it). Left out of dispatch when
      ``gradient_clip`` is 0.
    * ``EPOCH_END`` of a training run: ``trainer.check_better(cur_epoch, cur_loss)`` with the
      monitored epoch loss (``valid/loss`` when validating, else ``train/loss``); ``improved``
      records what it returned, for the compat state manager.
    """

    name = "zae_engine"
    runs_after = ("precision_mixer",)

    def __init__(self) -> None:
        self.improved = False
        self._clip = 0.0

    def setup(self, trainer: Any) -> None:
        self._clip = float(getattr(trainer, "gradient_clip", 0.0) or 0.0)

    def idle_events(self) -> frozenset[Any]:
        from ..events import Event

        return frozenset() if self._clip > 0 else frozenset({Event.BEFORE_OPTIMIZER_STEP})

    def on_before_optimizer_step(self, trainer: Any) -> None:
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), self._clip)

    def on_epoch_end(self, trainer: Any) -> None:
        self.improved = False
        if trainer.run_kind != "train":
            return
        value = trainer.monitored_value()
        if value is None or math.isnan(value):
            return
        self.improved = bool(trainer.check_better(cur_epoch=trainer.progress_checker.epoch - 1, cur_loss=value))


class Trainer(CoreTrainer.add_on(ZaeEngineLayer)):  # type: ignore[misc]
    """zae-engine's abstract trainer: subclass it, write ``train_step`` and ``test_step``.

    Parameters
    ----------
    model : nn.Module or None
        ``None`` builds a trainer that cannot run (zae-engine allows it; add-on tests use it).
    device : torch.device, str, list or None
        As the core: ``None`` picks the best available device.
    mode : {"train", "test"}
        ``"test"`` makes ``run`` evaluate only. :meth:`toggle` switches it later.
    optimizer : torch.optim.Optimizer or None
        ``None`` is accepted at construction; ``run`` in ``"train"`` mode then raises.
    scheduler : LR scheduler or None
        ``None`` is allowed (zae-engine called ``scheduler.step()`` regardless).
    log_bar : bool
        Progress bar on an interactive stderr.
    scheduler_step_on_batch : bool
        Step the scheduler after every optimizer step instead of every epoch.
    gradient_clip : float
        Max total L2 norm of the gradients, 0 to disable; applied after fp16 unscaling.
    **settings
        The core's keyword settings (``log_every_n_steps``, ``monitor``, ...) and the add-ons'
        (``save_path``, ``web_logger``, ``precision``, ...).

    Examples
    --------
    >>> class MyTrainer(Trainer):
    ...     def train_step(self, batch):
    ...         x, y = batch
    ...         return {"loss": nn.functional.mse_loss(self.model(x), y)}
    ...     def test_step(self, batch):
    ...         return self.train_step(batch)
    """

    def __init__(
        self,
        model: nn.Module | None,
        device: DeviceLike | Sequence[torch.device] = None,
        mode: str = "train",
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        *,
        log_bar: bool = True,
        scheduler_step_on_batch: bool = False,
        gradient_clip: float = 0.0,
        **settings: Any,
    ) -> None:
        if mode not in ("train", "test"):
            raise TrainerConfigError(f"mode must be 'train' or 'test', got {mode!r}")
        # Set before the core constructor: add-ons' setup() (run inside it) reads them.
        self.gradient_clip = float(gradient_clip)
        self.web_logger: dict[str, Any] = {}
        self.log_train: defaultdict[str, list[Any]] = defaultdict(list)
        self.log_test: defaultdict[str, list[Any]] = defaultdict(list)
        self.train_metrics: dict[str, Any] = {}
        self.test_metrics: dict[str, Any] = {}
        self.loss_history_train: list[Any] = []
        self.loss_history_test: list[Any] = []
        self.loss_buffer = math.inf
        self.weight_buffer: defaultdict[str, list[Any]] = defaultdict(list)
        self.batch_size: int | None = None
        self.valid_batch_size: int | None = None
        self._zae_mode = mode
        self._zae_ended: set[str] = set()  # phases whose logs are last epoch's (cleared on next use)
        self._zae_batches: dict[str, int] = {}  # batches logged per mode in the current phase
        self._zae_marks: dict[str, dict[str, int]] = {}  # per mode, per key: entries already on the host
        self._zae_history_marks = {"train": 0, "test": 0}
        self._zae_attribute_addons: tuple[Any, ...] = ()
        self._zae_web_loggers: tuple[Any, ...] = ()
        self._zae_no_optimizer = mode == "train" and optimizer is None
        self._zae_no_model = model is None
        super().__init__(
            nn.Module() if model is None else model,
            device,
            "test" if self._zae_no_optimizer else mode,  # the core refuses to train without one
            optimizer,
            scheduler,
            log_bar=log_bar,
            scheduler_step_on_batch=scheduler_step_on_batch,
            **settings,
        )
        if model is None:
            self.model = None
        if self.monitor_mode == "max":
            self.loss_buffer = -math.inf
        self._zae_web_loggers = tuple(a for a in self.addon_instances if hasattr(a, "log_step"))
        self._zae_attribute_addons = tuple(a for a in self.addon_instances if getattr(a, "trainer_attributes", ()))
        for method in ("run_batch", "run_epoch"):
            if getattr(type(self), method) is not getattr(Trainer, method):
                warnings.warn(
                    f"{type(self).__qualname__} overrides {method}(), which the zae_trainer loop does not call "
                    f"(it calls it only when you do). Move per-batch logic to train_step/test_step, logging() "
                    f"or an add-on hook (see docs/guides/migrating-from-zae-engine.md).",
                    UserWarning,
                    stacklevel=2,
                )

    # ==================================================================================
    # zae-engine's mode (the core's run kind is fixed; zae-engine's mode flips)
    # ==================================================================================
    @property
    def mode(self) -> str:
        """``"train"`` or ``"test"``: ``"test"`` during validation, as in zae-engine."""
        return "test" if self.phase == "valid" else self._zae_mode

    @mode.setter
    def mode(self, value: str) -> None:
        self.toggle(value)

    def toggle(self, mode: str | None = None) -> None:
        """Switch between ``"train"`` and ``"test"``, or to ``mode`` when given.

        ``run()`` in ``"test"`` mode evaluates only; a trainer built with ``mode="train"``
        then evaluates outside the core loop (no add-on events), as zae-engine did.
        """
        if mode is None:
            mode = "test" if self._zae_mode == "train" else "train"
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        self._zae_mode = mode

    # ==================================================================================
    # The core's extension points
    # ==================================================================================
    def record_step(self, outputs: Mapping[str, Any], batch_size: int) -> None:
        super().record_step(outputs, batch_size)
        self.logging(dict(outputs))

    def phase_end_metrics(self, phase: Phase) -> Mapping[str, Any]:
        extra = dict(super().phase_end_metrics(phase))
        return {**extra, **self._zae_phase_end("train" if phase == "train" else "test")}

    def _zae_phase_end(self, mode: str) -> dict[str, float]:
        """End of zae-engine's ``run_epoch``: logs to CPU, ``print_log``, ``metric_on_epoch_end``."""
        log = self.log_train if mode == "train" else self.log_test
        self._zae_to_host(mode)
        self._zae_ended.add(mode)
        n = self._zae_batches.get(mode, 0)
        self.print_log(cur_batch=n, num_batch=n)
        user = self.metric_on_epoch_end() or {}
        (self.train_metrics if mode == "train" else self.test_metrics).update(user)
        return {str(k): v for k, v in user.items() if _is_number(v)}

    # ==================================================================================
    # zae-engine's user-facing methods
    # ==================================================================================
    def metric_on_epoch_end(self) -> dict[str, float]:
        """Override (or assign on the instance) to add metrics at the end of each phase.

        Called once after the training batches and once after the validation batches of
        every epoch, with ``log_train`` / ``log_test`` complete and on the CPU. What it
        returns updates ``train_metrics`` / ``test_metrics``; numeric values also become the
        epoch metrics ``train/<name>`` / ``valid/<name>`` that loggers, checkpoints and
        ``monitor=`` see.
        """
        return {}

    def logging(self, step_dict: dict[str, Any]) -> None:
        """Record one batch's outputs in ``log_train`` / ``log_test`` (called once per batch).

        Override it, calling ``super().logging(step_dict)``, to see every batch, in training
        and validation, as in zae-engine. Cost: one Python call per batch; scalar tensors are
        kept on the device (no synchronisation) and moved to the CPU together every 1024
        batches and at the end of the phase, while non-scalar tensors (``"output"``) are
        copied to the CPU per batch, as zae-engine did (one device synchronisation per batch
        when a step returns them).
        """
        mode = self.mode
        if mode in self._zae_ended:  # first batch of a new phase: last epoch's values go
            self._zae_ended.discard(mode)
            (self.log_train if mode == "train" else self.log_test).clear()
            self._zae_marks.pop(mode, None)
            self._zae_batches[mode] = 0
        log, history = (self.log_train, self.loss_history_train) if mode == "train" else (
            self.log_test, self.loss_history_test)
        for key, value in step_dict.items():
            if isinstance(value, torch.Tensor):
                value = value.detach()
                if value.numel() != 1:
                    value = value.to(_CPU)
            log[key].append(value)
            if key == "loss":
                history.append(value)
        count = self._zae_batches[mode] = self._zae_batches.get(mode, 0) + 1
        if count % _HOST_EVERY == 0:  # bound what stays on the device in a long phase
            self._zae_to_host(mode)
        for logger in self._zae_web_loggers:
            logger.log_step(step_dict)

    def _zae_to_host(self, mode: str) -> None:
        """Move the scalars logged since the last call to the CPU, one copy per key."""
        log, history = (self.log_train, self.loss_history_train) if mode == "train" else (
            self.log_test, self.loss_history_test)
        marks = self._zae_marks.setdefault(mode, {})
        for key, values in log.items():
            _to_host(values, marks.get(key, 0))
            marks[key] = len(values)
        _to_host(history, self._zae_history_marks[mode])
        self._zae_history_marks[mode] = len(history)

    def print_log(self, cur_batch: int, num_batch: int) -> dict[str, str]:
        """zae-engine's batch report: ``{"Batch": "i/n", "LR": ..., <metric>: <mean>}``.

        Called once at the end of every phase (zae-engine called it per batch for its
        progress bar; the core's display shows the running metrics instead).
        """
        log = self.log_train if self.mode == "train" else self.log_test
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0
        report = {"Batch": f"{cur_batch}/{num_batch}", "LR": f"{lr:.3e}"}
        for key, values in log.items():
            if "output" in key:
                continue
            numbers = [n for n in (_as_float(v) for v in values) if n is not None]
            if numbers:
                report[key] = f"{sum(numbers) / len(numbers):.6f}"
        return report

    def log_reset(self, epoch_end: bool = False) -> None:
        """Clear ``log_train`` / ``log_test``; with ``epoch_end=True`` also the epoch metrics dicts."""
        self.log_train.clear()
        self.log_test.clear()
        self._zae_marks.clear()
        if epoch_end:
            self.train_metrics.clear()
            self.test_metrics.clear()

    def check_better(self, cur_epoch: int, cur_loss: float) -> bool:
        """Keep a copy of the weights when ``cur_loss`` beats the best so far.

        Fixed from zae-engine: the buffer holds a CPU *copy* (zae-engine stored references,
        so its "best" weights followed training), and only the latest best copy is kept
        (earlier entries become None) so memory stays flat. Lower is better unless
        ``monitor_mode="max"``.
        """
        better = cur_loss > self.loss_buffer if self.monitor_mode == "max" else cur_loss < self.loss_buffer
        if not better:
            return False
        weights = {k: v.detach().to(_CPU, copy=True) for k, v in self.raw_model.state_dict().items()}
        self.weight_buffer["epoch"].append(cur_epoch)
        self.weight_buffer["weight"].append(weights)
        if len(self.weight_buffer["weight"]) > 1:
            self.weight_buffer["weight"][-2] = None
        self.loss_buffer = cur_loss
        return True

    def get_loss_history(self, mode: str = "train") -> list[Any]:
        """Every batch's loss over the trainer's life, for ``"train"`` or ``"test"``."""
        if mode == "train":
            return self.loss_history_train
        if mode == "test":
            return self.loss_history_test
        raise ValueError(f"Mode must be 'train' or 'test', got '{mode}'.")

    def save_model(self, filename: str | os.PathLike[str]) -> None:
        """Write the (unwrapped) model's ``state_dict`` to ``filename`` with ``torch.save``."""
        torch.save(self.raw_model.state_dict(), filename)

    def apply_weights(self, filename: str | os.PathLike[str] | None = None, strict: bool = True) -> None:
        """Load weights: from ``filename``, or the best in-memory copy when ``None``.

        Fixed from zae-engine: a missing file or an empty buffer raises (zae-engine printed
        and carried on with the wrong weights), and files load with ``weights_only=True``.
        """
        if filename is not None:
            path = os.fspath(filename)
            if not os.path.exists(path):
                folder = os.path.dirname(os.path.abspath(path))
                listing = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
                raise FileNotFoundError(f"apply_weights: no file {path!r}. Files in {folder!r}: {listing[:20] or '(none)'}")
            from ..addons.checkpoint.zae_engine_folder import read_model

            weights = read_model(path)
        else:
            buffered = [w for w in self.weight_buffer["weight"] if w is not None]
            if not buffered:
                raise RuntimeError(
                    "apply_weights(): no best weights in memory yet; they are kept at the end of each training "
                    "epoch that improves the monitored loss. Pass a filename, or run() first."
                )
            weights = buffered[-1]
        self.raw_model.load_state_dict(weights, strict=strict)

    def _to_device(self, *args: Any, **kwargs: Any) -> Any:
        """Move arguments to the trainer's device (one -> it, several -> tuple, keywords -> dict)."""
        if kwargs and not args:
            return {k: move_to_device(v, self.device, self.non_blocking) for k, v in kwargs.items()}
        if len(args) == 1:
            arg = args[0]
            return arg.to(self.device) if isinstance(arg, nn.Module) else move_to_device(arg, self.device, self.non_blocking)
        return tuple(move_to_device(a, self.device, self.non_blocking) for a in args)

    def _to_cpu(self, *args: Any) -> Any:
        """Detach tensors and move them to the CPU (one -> it, several -> tuple)."""
        if len(args) == 1:
            arg = args[0]
            return arg.detach().cpu() if isinstance(arg, torch.Tensor) else arg
        return tuple(self._to_cpu(a) for a in args)

    def _check_batch_size(self) -> None:
        self.batch_size = getattr(self.loader, "batch_size", None) if self.loader is not None else 0
        self.valid_batch_size = getattr(self.valid_loader, "batch_size", None) if self.valid_loader is not None else 0

    # ==================================================================================
    # Running
    # ==================================================================================
    def run(self, n_epoch: int, loader: Iterable[Any], valid_loader: Iterable[Any] | None = None, **kwargs: Any) -> None:
        """Train for ``n_epoch`` epochs, validating on ``valid_loader`` (zae-engine's ``run``).

        In ``"test"`` mode it evaluates ``loader`` ``n_epoch`` times. Extra keyword arguments
        reach ``scheduler.step``.
        """
        if self._zae_no_model:
            raise TrainerConfigError(
                "this trainer was built with model=None and cannot run. To fix, pass the model to the constructor."
            )
        self.loader, self.valid_loader = loader, valid_loader
        self._check_batch_size()
        if self._zae_mode == "train" and self._zae_no_optimizer:
            raise TrainerConfigError(
                "mode='train' needs an optimizer, but this trainer was built with optimizer=None. To fix, pass "
                "optimizer=torch.optim.Adam(model.parameters()) to the constructor, or toggle('test') to evaluate."
            )
        if self._zae_mode == "test" and self.run_kind == "train":  # toggled: evaluate outside the loop
            for _ in range(n_epoch):
                self.run_epoch(loader, **kwargs)
            return
        super().run(n_epoch, loader, valid_loader, **kwargs)

    def run_epoch(self, loader: Iterable[Any], **kwargs: Any) -> None:
        """Run every batch of ``loader`` in the current mode, then the phase-end calls.

        For direct calls (the core loop runs its own epochs): add-on events are not emitted.
        """
        mode = self._zae_mode
        self._zae_ended.add(mode)  # a fresh log for this pass
        for batch in loader:
            if batch is not None:
                self.run_batch(batch, **kwargs)
        if mode in self._zae_ended:  # no batch at all
            (self.log_train if mode == "train" else self.log_test).clear()
            self._zae_marks.pop(mode, None)
            self._zae_batches[mode] = 0
        self._zae_phase_end(mode)

    def run_batch(self, batch: Any, **kwargs: Any) -> None:
        """One batch in the current mode, outside the core loop (for direct calls).

        Training: ``train_step``, backward, ``gradient_clip``, optimizer step, per-batch
        scheduler step, ``logging``. Testing: ``test_step`` under ``no_grad``, ``logging``.
        Add-on events are not emitted; ``run()`` is the way to train with add-ons.
        """
        if self.model is None:
            raise TrainerConfigError("this trainer was built with model=None; pass the model to the constructor")
        batch = move_to_device(batch, self.device, self.non_blocking)
        if self._zae_mode == "train":
            if self.optimizer is None:
                raise TrainerConfigError("run_batch in 'train' mode needs an optimizer; pass optimizer= to the constructor")
            self.model.train()
            self.zero_grad()
            with self.autocast():
                step_dict = self.train_step(batch)
            self.backward(step_dict["loss"])
            if self.gradient_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.gradient_clip)
            self.optimizer_step()
            self.progress_checker.update_step()
            if self.scheduler is not None and self.scheduler_step_on_batch:
                self.scheduler.step(**kwargs)
        else:
            self.model.eval()
            with torch.no_grad(), self.autocast():
                step_dict = self.test_step(batch)
        self.logging(dict(step_dict))

    def inference(self, loader: Iterable[Any]) -> list[Any]:
        """Evaluate ``loader``; return ``log_test["output"]`` (one CPU tensor per batch).

        As zae-engine: ``log_test`` holds this pass's values afterwards; ``mode``,
        ``train_metrics`` and ``test_metrics`` are as they were.
        """
        saved_mode = self._zae_mode
        saved = (dict(self.train_metrics), dict(self.test_metrics))
        self._zae_mode = "test"
        try:
            self.run_epoch(loader)
        finally:
            self._zae_mode = saved_mode
            self.train_metrics, self.test_metrics = saved
        return list(self.log_test.get("output", []))

    # ==================================================================================
    # Add-on attributes zae-engine put on the trainer (trainer.precision, trainer.save_path)
    # ==================================================================================
    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the trainer does not have: no cost on normal access.
        if not name.startswith("_"):
            for addon in self.__dict__.get("_zae_attribute_addons", ()):
                if name in addon.trainer_attributes:
                    return getattr(addon, addon.trainer_attributes[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _to_host(values: list[Any], start: int = 0) -> None:
    """Move ``values[start:]``'s device tensors (scalars) to the CPU in one copy, in place."""
    on_device = [
        i for i in range(start, len(values))
        if isinstance(values[i], torch.Tensor) and values[i].device.type != "cpu"
    ]
    if not on_device:
        return
    try:
        stacked = torch.stack([values[i].reshape(()) for i in on_device]).to(_CPU)
    except RuntimeError:  # mixed dtypes or devices under one key: one copy each
        for i in on_device:
            values[i] = values[i].to(_CPU)
        return
    for j, i in enumerate(on_device):
        values[i] = stacked[j].reshape(values[i].shape)


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _is_number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)
