"""StateManagerAddon: checkpoints that survive crashes and resume a run exactly.

What it does, and when:

* ``EPOCH_END`` — saves when the epoch is among the best ``keep_top_k`` by the monitored
  metric (``trainer.monitor_name()``: ``valid/loss``, else ``train/loss``; ``monitor_mode``),
  and always as "last" (``save_last``), and every ``save_every_n_epochs`` epochs.
* every ``save_every_n_steps`` optimizer steps — at the log point of that step, once the
  step's loss has been read (so it is in the checkpoint's loss history, and a NaN loss has
  already stopped the run instead of being saved).
* ``INTERRUPT`` (SIGINT / SIGTERM, at a step boundary) and ``EXCEPTION`` (when the state is
  consistent) — an emergency checkpoint before the run exits.
* ``RUN_BEGIN`` — ``resume="latest" | "best" | path`` restores everything, mid-epoch included.

Files live in ``save_path`` with a ``manifest.json`` naming them, the latest and the best.
See :mod:`zae_trainer.addons.checkpoint` for the schema, formats and guarantees.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Mapping
from typing import Any, Iterable, Literal

from ..addon import AddOn
from ..errors import AddOnHookError, NonFiniteLossError, TrainerConfigError
from .checkpoint.async_writer import AsyncWriter, detached_copy
from .checkpoint.atomic import remove_stale_temps
from .checkpoint.data_position import (
    ResumePlan,
    capture_epoch_start,
    fast_forward,
    generator_states,
    is_stateful_loader,
    set_generator_states,
)
from .checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
)
from .checkpoint.formats import (
    describe_folder,
    normalise_format,
    read_checkpoint,
    read_weights,
    write_checkpoint,
    write_weights,
)
from .checkpoint.manifest import Entry, Manifest
from .checkpoint.schema import apply_checkpoint, build_checkpoint, check_model_fits
from .checkpoint.tree import to_plain
from .checkpoint.zae_engine_folder import find_for_load, load_into_trainer

__all__ = ["StateManagerAddon"]

PathLike = str | os.PathLike[str]


class _ResumeDataPosition:
    """Strategy: continue a resumed epoch at the exact batch, without loading skipped data."""

    def skip_consumed_batches(self, loader: Iterable[Any], consumed: int) -> Iterable[Any]:
        manager = self.get_addon(StateManagerAddon.name)  # type: ignore[attr-defined]
        plan = manager.take_resume_plan()
        if plan is None:
            return super().skip_consumed_batches(loader, consumed)  # type: ignore[misc]
        plan.batch_in_epoch = consumed
        return fast_forward(loader, plan, super().skip_consumed_batches)  # type: ignore[misc]


class StateManagerAddon(AddOn):
    """Checkpointing: best / last / periodic / emergency saves, exact resume, safe loading.

    Parameters
    ----------
    save_path : str or PathLike
        Folder for checkpoints and ``manifest.json`` (created if missing).
    save_format : {"ckpt", "safetensors"}
        ``"ckpt"``: one ``torch.save`` file, loaded with ``weights_only=True``.
        ``"safetensors"``: a folder of ``.safetensors`` files plus JSON, no pickle at all.
        zae-engine's spelling ``"safetensor"`` is accepted.
    keep_top_k : int
        How many best checkpoints (by the monitored metric) to keep. 0 keeps none for merit.
    keep_last : int
        How many most recent checkpoints to keep besides the best (the newest is always kept).
    save_last : bool
        Save at the end of every epoch.
    save_every_n_steps : int or None
        Also save every N optimizer steps (mid-epoch). Must be a multiple of the trainer's
        ``log_every_n_steps``: step checkpoints are written when the step's loss is read.
    save_every_n_epochs : int or None
        Also save every N epochs (useful with ``save_last=False``).
    save_on_interrupt, save_on_exception : bool
        Write an emergency checkpoint on SIGINT/SIGTERM, or when the run raises while the
        model, optimizer and data position agree (not in the middle of an optimizer update
        or an accumulation group, not after a non-finite loss).
    resume : {"latest", "best"} or path or None
        Restore from this checkpoint when ``run()`` starts. ``"latest"`` / ``"best"`` start a
        fresh run if ``save_path`` holds none, and skip a damaged newest file with a warning.
    strict : bool
        Whether a checkpoint must match the model exactly when loaded.
    async_save : bool
        Copy tensors to CPU on the training thread and write them in a background thread.
    model_config : Mapping or None
        Plain description of the model stored with every checkpoint (default: the
        model's own ``config`` mapping, if it has one).

    Examples
    --------
    >>> Trainer.add_on(StateManagerAddon)(model, optimizer=opt, save_path="ckpts",
    ...                                    save_format="safetensors", resume="latest")  # doctest: +SKIP
    >>> Trainer.add_on(StateManagerAddon(save_path="ckpts", keep_top_k=1))(model, optimizer=opt)  # doctest: +SKIP
    """

    name = "state_manager"
    order = -100  # first on RUN_BEGIN (restore before others read state), last on *_END (after
    # early stopping and schedulers updated the state it records)
    exports = ("save_state", "load_state", "save_model", "apply_weights", "export_weights", "wait_for_checkpoint")
    trainer_mixin = _ResumeDataPosition

    def __init__(
        self,
        *,
        save_path: PathLike,
        save_format: Literal["ckpt", "safetensors", "safetensor"] = "ckpt",
        keep_top_k: int = 3,
        keep_last: int = 2,
        save_last: bool = True,
        save_every_n_steps: int | None = None,
        save_every_n_epochs: int | None = None,
        save_on_interrupt: bool = True,
        save_on_exception: bool = True,
        resume: PathLike | None = None,
        strict: bool = True,
        async_save: bool = False,
        model_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.save_path = os.fspath(save_path)
        self.save_format = normalise_format(save_format)
        self.keep_top_k = _count("keep_top_k", keep_top_k)
        self.keep_last = _count("keep_last", keep_last)
        self.save_last = bool(save_last)
        self.save_every_n_steps = _optional_positive("save_every_n_steps", save_every_n_steps)
        self.save_every_n_epochs = _optional_positive("save_every_n_epochs", save_every_n_epochs)
        self.save_on_interrupt = bool(save_on_interrupt)
        self.save_on_exception = bool(save_on_exception)
        self.resume = os.fspath(resume) if resume is not None else None
        self.strict = bool(strict)
        self.async_save = bool(async_save)
        self.model_config = dict(model_config) if model_config is not None else None
        self._writer = AsyncWriter()
        self._manifest: Manifest | None = None
        self._plan: ResumePlan | None = None
        self._epoch_start: dict[str, Any] | None = None
        self._resumed = False
        self._updating = False  # between BEFORE_OPTIMIZER_STEP and TRAIN_BATCH_END
        self._last_step_saved = -1

    # ==================================================================================
    # Setup and hooks
    # ==================================================================================
    def setup(self, trainer: Any) -> None:
        n, log = self.save_every_n_steps, trainer.log_every_n_steps
        if n is not None and n % log:
            raise TrainerConfigError(
                f"save_every_n_steps={n} must be a multiple of log_every_n_steps={log}: step checkpoints are "
                "written when the step's loss is read, so they hold the complete loss history and never a "
                f"NaN step. To fix, use save_every_n_steps={max(log, n // log * log)} or log_every_n_steps={n}."
            )
        to_plain(trainer.config, "config")  # a config that cannot be saved fails now, not at epoch 1
        if self.model_config is not None:
            to_plain(self.model_config, "model_config")
        if trainer.is_main_process:
            os.makedirs(self.save_path, exist_ok=True)
            remove_stale_temps(self.save_path)
        self._manifest = Manifest.load(self.save_path, mode=trainer.monitor_mode)

    def on_run_begin(self, trainer: Any) -> None:
        if self.resume is not None and not self._resumed:
            self._resumed = True
            self._load(self.resume, strict=self.strict, fresh_if_empty=self.resume in ("latest", "best"))

    def on_epoch_begin(self, trainer: Any) -> None:
        plan = self._plan
        if plan is not None and plan.batch_in_epoch > 0:
            self._epoch_start = plan.epoch_start  # the resumed epoch began in the earlier process
            return
        if plan is not None:  # resumed at an epoch boundary: only the loaders' generators are left
            set_generator_states(trainer.loader, plan.generators)
            self._plan = None
        self._epoch_start = capture_epoch_start(trainer.loader)

    def on_before_optimizer_step(self, trainer: Any) -> None:
        self._updating = True

    def on_train_batch_end(self, trainer: Any) -> None:
        self._updating = False

    def on_log(self, trainer: Any, metrics: Mapping[str, float]) -> None:
        n = self.save_every_n_steps
        step = trainer.progress_checker.step
        if n is not None and step % n == 0 and step != self._last_step_saved and trainer.mode == "train":
            if trainer.progress_checker.batch_in_epoch > 0:  # epoch-end logs come after EPOCH_END's save
                self._save(["step"])

    def on_epoch_end(self, trainer: Any) -> None:
        if trainer.mode != "train":
            return
        self._writer.wait()
        pc = trainer.progress_checker
        value = _finite(trainer.monitored_value())
        reasons = []
        if self._manifest is not None and self._manifest.would_rank(value, self.keep_top_k):
            reasons.append("best")
        if self.save_last:
            reasons.append("last")
        if self.save_every_n_epochs is not None and pc.epoch % self.save_every_n_epochs == 0:
            reasons.append("epoch")
        if reasons:
            self._save(reasons)

    def on_interrupt(self, trainer: Any, signum: int) -> None:
        if not self.save_on_interrupt or trainer.mode != "train":
            return
        pc = trainer.progress_checker
        if pc.batch_in_epoch % trainer.accumulate_grad_batches:
            warnings.warn(
                f"interrupted inside a gradient-accumulation group (batch {pc.batch_in_epoch} of the epoch); the "
                "emergency checkpoint resumes after it, without the partial group's gradients.",
                RuntimeWarning,
                stacklevel=2,
            )
        self._save(["interrupt"], wait_for_write=True)

    def on_exception(self, trainer: Any, exception: BaseException) -> None:
        if not self.save_on_exception:
            return
        reason = self._inconsistent_because(trainer, exception)
        if reason is not None:
            warnings.warn(f"no emergency checkpoint: {reason}", RuntimeWarning, stacklevel=2)
            return
        self._save(["exception"], wait_for_write=True)

    def on_run_end(self, trainer: Any) -> None:
        self._writer.wait()

    # ==================================================================================
    # Exported to the trainer
    # ==================================================================================
    def save_state(self, reason: str = "manual") -> str | None:
        """Write a full checkpoint now; return its path (None on non-main processes).

        zae-engine's ``save_state()``; the checkpoint is listed in the manifest as ``reason``.
        """
        return self._save([reason], wait_for_write=not self.async_save)

    def load_state(self, source: PathLike = "latest", strict: bool | None = None) -> str | None:
        """Restore everything from a checkpoint now: ``"latest"``, ``"best"`` or a path.

        Returns the path loaded (None when ``save_path`` holds no checkpoint yet and
        ``source`` is ``"latest"`` / ``"best"``). The data position is applied when the
        next training epoch iterates its loader, so ``run()`` continues mid-epoch.
        """
        return self._load(os.fspath(source), strict=self.strict if strict is None else strict,
                          fresh_if_empty=os.fspath(source) in ("latest", "best"))

    def save_model(self, filename: PathLike) -> str | None:
        """Write the unwrapped model's weights alone (zae-engine's ``save_model``).

        The format follows the extension (``.safetensors`` / ``.safetensor`` → safetensors,
        anything else → a ``torch.save`` state dict), then ``save_format``.
        """
        if not self.trainer.is_main_process:
            return None
        path = os.fspath(filename)
        fmt = "safetensors" if path.endswith((".safetensors", ".safetensor")) else (
            "ckpt" if path.endswith((".ckpt", ".pt", ".pth", ".bin")) else self.save_format
        )
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        write_weights(path, self.trainer.raw_model.state_dict(), fmt, self._weights_metadata())
        return path

    def export_weights(self, filename: PathLike, source: PathLike | None = None) -> str | None:
        """Write model weights alone to a ``.safetensors`` file, for serving.

        ``source=None`` exports the model as it is now; ``"best"``, ``"latest"`` or a
        checkpoint path exports that checkpoint's weights without touching the model.
        """
        if not self.trainer.is_main_process:
            return None
        path = os.fspath(filename)
        weights = self.trainer.raw_model.state_dict() if source is None else read_weights(self._resolve(os.fspath(source)))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_weights(path, weights, "safetensors", self._weights_metadata())
        return path

    def apply_weights(self, filename: PathLike | None = None, strict: bool = True) -> None:
        """Load weights into the model, e.g. the best ones before inference or testing.

        ``filename`` may be a weights file, a checkpoint, or ``"best"`` / ``"latest"`` (from
        the manifest). ``None`` (zae-engine) uses the best weights kept in memory by this
        run, else the best checkpoint in ``save_path``.
        """
        trainer = self.trainer
        if filename is None:
            buffered = [w for w in trainer.weight_buffer.get("weight", []) if w is not None]
            if buffered:
                weights, source = buffered[-1], "in-memory best weights"
            else:
                source = self._resolve("best")
                weights = read_weights(source)
        else:
            source = self._resolve(os.fspath(filename))
            weights = read_weights(source)
        fitting = check_model_fits(trainer.raw_model, weights, source, strict)
        trainer.raw_model.load_state_dict(fitting, strict=strict)

    def wait_for_checkpoint(self) -> None:
        """Block until a background (``async_save``) write is on disk; raise its error if it failed."""
        self._writer.wait()

    # ==================================================================================
    # For the strategy mixin
    # ==================================================================================
    def take_resume_plan(self) -> ResumePlan | None:
        """The pending data position of a loaded checkpoint (handed over once)."""
        plan, self._plan = self._plan, None
        return plan

    # ==================================================================================
    # Saving
    # ==================================================================================
    def _save(self, reasons: list[str], wait_for_write: bool = False) -> str | None:
        trainer = self.trainer
        if not trainer.is_main_process:
            return None
        self._writer.wait()
        manifest = self._manifest_now()
        pc = trainer.progress_checker
        checkpoint = build_checkpoint(
            trainer, reasons=reasons, data_position=self._data_position(), model_config=self.model_config
        )
        at_epoch_end = pc.batch_in_epoch == 0 and bool(trainer.history)
        entry = Entry(
            name=self._unique_name(manifest, reasons),
            epoch=pc.epoch,
            step=pc.step,
            batch_in_epoch=pc.batch_in_epoch,
            reasons=list(reasons),
            monitor=trainer.monitor_name(),
            value=_finite(trainer.monitored_value()) if at_epoch_end else None,
            metrics=dict(trainer.epoch_metrics) if at_epoch_end else {},
        )
        path = os.path.join(self.save_path, entry.name)
        self._last_step_saved = pc.step

        def publish() -> list[str]:
            write_checkpoint(path, checkpoint, self.save_format)
            entry.size = os.path.getsize(path) if os.path.isfile(path) else None
            manifest.add(entry)
            dropped = manifest.retain(self.keep_last, self.keep_top_k)
            manifest.write()
            return [os.path.join(self.save_path, old.name) for old in dropped]

        def delete(paths: list[str]) -> None:  # only once no manifest names them
            for old in paths:
                _remove(old)

        if self.async_save and not wait_for_write:
            checkpoint = detached_copy(checkpoint, self._writer.pool)
            self._writer.submit(path, lambda: delete(publish()))
            return path
        dropped = publish()
        if dropped:  # deleting a large file can take longer than writing one: not on the loop's time
            self._writer.submit(f"deletion of {dropped}", lambda: delete(dropped))
        return path

    def _data_position(self) -> dict[str, Any]:
        trainer = self.trainer
        loader = trainer.loader
        in_epoch = trainer.progress_checker.batch_in_epoch
        return {
            "batch_in_epoch": in_epoch,
            "epoch_start": self._epoch_start if in_epoch > 0 else None,
            "generators": generator_states(loader) if loader is not None else {},
            "loader_state": loader.state_dict() if loader is not None and is_stateful_loader(loader) else None,
        }

    def _unique_name(self, manifest: Manifest, reasons: list[str]) -> str:
        pc = self.trainer.progress_checker
        base = f"epoch{pc.epoch:04d}-step{pc.step:07d}"
        if pc.batch_in_epoch:
            base += f"-batch{pc.batch_in_epoch:05d}"
        if reasons[0] in ("interrupt", "exception"):
            base += f"-{reasons[0]}"
        suffix = ".ckpt" if self.save_format == "ckpt" else ""
        taken = {e.name for e in manifest.entries}
        name, n = base + suffix, 1
        while name in taken or os.path.exists(os.path.join(self.save_path, name)):
            n += 1
            name = f"{base}-v{n}{suffix}"
        return name

    def _weights_metadata(self) -> dict[str, str]:
        pc = self.trainer.progress_checker
        return {"format": "pt", "producer": "zae_trainer", "epoch": str(pc.epoch), "step": str(pc.step)}

    def _inconsistent_because(self, trainer: Any, exc: BaseException) -> str | None:
        original = exc.original if isinstance(exc, AddOnHookError) else exc
        if isinstance(original, CheckpointError):
            return "the failure was in writing or reading a checkpoint"
        if isinstance(original, NonFiniteLossError):
            return "the loss was not finite, so the weights may be too"
        if trainer.optimizer is None:
            return "there is no training state (no optimizer)"
        if self._updating:
            return "the error came during an optimizer update, which may be half applied"
        if trainer.progress_checker.batch_in_epoch % trainer.accumulate_grad_batches:
            return "the error came inside a gradient-accumulation group"
        return None

    def _manifest_now(self) -> Manifest:
        if self._manifest is None:
            self._manifest = Manifest.load(self.save_path, mode=self.trainer.monitor_mode)
        return self._manifest

    # ==================================================================================
    # Loading
    # ==================================================================================
    def _resolve(self, source: str) -> str:
        """A path for ``source``: ``"best"``/``"latest"`` from the manifest, else the path itself."""
        if source in ("latest", "best"):
            self._writer.wait()
            manifest = Manifest.load(self.save_path, mode=self.trainer.monitor_mode)
            entry = manifest.best() if source == "best" else manifest.latest()
            if entry is None:
                raise CheckpointNotFoundError(
                    f"no {source} checkpoint: {os.path.join(self.save_path, 'manifest.json')!r} lists none; "
                    f"{describe_folder(self.save_path)}",
                    self.save_path,
                )
            return os.path.join(self.save_path, entry.name)
        if not os.path.exists(source) and os.path.exists(os.path.join(self.save_path, source)):
            return os.path.join(self.save_path, source)
        return source

    def _load(self, source: str, strict: bool, fresh_if_empty: bool) -> str | None:
        self._writer.wait()
        if source not in ("latest", "best"):
            path = self._resolve(source)
            legacy = find_for_load(path)
            if legacy is not None:  # a folder zae-engine wrote (model.ckpt, optimizer.zae, ...)
                self._plan = None
                return load_into_trainer(self.trainer, legacy, strict)
            checkpoint = read_checkpoint(path)
            self._plan = apply_checkpoint(self.trainer, checkpoint, path, strict)
            return path
        manifest = Manifest.load(self.save_path, mode=self.trainer.monitor_mode)
        candidates = manifest.candidates(source)
        if not candidates:
            legacy = find_for_load(self.save_path)
            if legacy is not None:  # never start from scratch over a zae-engine folder without a word
                self._plan = None
                return load_into_trainer(self.trainer, legacy, strict)
            if fresh_if_empty:
                return None
            raise CheckpointNotFoundError(f"no checkpoint to resume: {describe_folder(self.save_path)}", self.save_path)
        failures: list[str] = []
        for entry in candidates:
            path = os.path.join(self.save_path, entry.name)
            try:
                _check_size(path, entry)
                checkpoint = read_checkpoint(path)
            except CheckpointError as exc:
                failures.append(str(exc))
                warnings.warn(
                    f"skipping damaged checkpoint while resuming from {source!r}: {exc}", RuntimeWarning, stacklevel=3
                )
                continue
            self._plan = apply_checkpoint(self.trainer, checkpoint, path, strict)
            return path
        raise CheckpointCorruptError(
            f"none of the {len(candidates)} checkpoints listed in {manifest.path!r} could be read: "
            + " | ".join(failures),
            manifest.path,
        )


def _check_size(path: str, entry: Entry) -> None:
    if entry.size is None or not os.path.isfile(path):
        if not os.path.exists(path):
            raise CheckpointNotFoundError(f"the manifest lists {path!r} but it is gone; {describe_folder(path)}", path)
        return
    actual = os.path.getsize(path)
    if actual != entry.size:
        raise CheckpointCorruptError(
            f"{path!r} is {actual} bytes but was written as {entry.size}: it was truncated or overwritten", path
        )


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _optional_positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
    return value

