"""StateManagerAddon: checkpoints that survive crashes and resume a run exactly.

What it does, and when:

* ``EPOCH_END`` — saves when the epoch is among the best ``keep_top_k`` by the trainer's
  monitored metric (``trainer.monitor_name()``: ``valid/loss``, else ``train/loss``;
  ``monitor_mode``) or among the best of any further criterion in ``monitors``; always as
  "last" (``save_last``); and every ``save_every_n_epochs`` epochs ("epoch", periodic).
* every ``save_every_n_steps`` optimizer steps — at the log point of that step, once the
  step's loss has been read (a NaN loss has already stopped the run instead of being saved).
* ``INTERRUPT`` (SIGINT / SIGTERM, at a step boundary) and ``EXCEPTION`` (when the state is
  consistent) — an emergency checkpoint before the run exits.
* ``RUN_BEGIN`` — ``resume="latest" | "best" | "best:<metric>" | path`` restores
  everything, mid-epoch included. A damaged newest checkpoint is skipped with a warning.

Folder layout (``save_path``)::

    manifest.json                  which checkpoints exist, "latest", "best", "best_by"
    epoch0003-step0000384.ckpt     one checkpoint (save_format="ckpt": a torch.save file)
    epoch0004-step0000512/         one checkpoint (save_format="safetensors": a folder with
                                   model.safetensors, optimizer.safetensors, checkpoint.json,
                                   and state.safetensors when add-ons keep tensors)
    best.ckpt -> epoch0003-...     symbolic links at fixed names (link_best_last=True):
    last.ckpt -> epoch0004-...     "best", "last", and "best-<metric>" per extra monitor
                                   ("valid/acc" -> best-valid_acc); no suffix for folders

Names come from ``filename_prefix + filename.format(epoch=, step=, batch=, reason=)``
(default ``"epoch{epoch:04d}-step{step:07d}"``); mid-epoch saves get ``-batchNNNNN`` and
emergency saves ``-interrupt`` / ``-exception`` unless the template places ``{batch}`` /
``{reason}`` itself; a clash gets ``-v2``, ``-v3``.

"Best" follows one rule everywhere: a value must be strictly better to count, so on a tie
the earliest checkpoint stays best. The run summary's best epoch, ``manifest.json``'s
``best``, the ``best`` link, top-k retention, ``apply_weights("best")`` and
``resume="best"`` therefore name the same epoch (as long as that checkpoint was saved:
``save_last=True`` or ``keep_top_k >= 1``).

Retention, after every save (each rule keeps its own; a checkpoint kept by any rule stays,
and a checkpoint picked by several rules is one file):

* the newest ``keep_last`` (the latest is always kept: resume needs it);
* the best ``keep_top_k`` by the trainer's monitor, and the best ``top_k`` of each entry
  of ``monitors``;
* periodic checkpoints (``save_every_n_epochs``): the newest ``keep_periodic`` of them,
  all when ``keep_periodic=None`` (default).

Deleting is crash-safe: a dropped checkpoint is first renamed to ``.<name>.deleting`` (one
atomic rename), then removed in the background; a normal interpreter exit waits for it
(the writer thread is not a daemon), and any trainer opening the folder finishes marked
deletions left by a killed process. The links are replaced atomically and never point at a
dropped checkpoint.

Checkpoint schema (format version 2): see :mod:`zae_trainer.addons.checkpoint.schema`. It
no longer stores per-step losses unless ``save_loss_history=True`` (and the trainer keeps
them); version 1 files still load. Files of other trainers load through the same safe
loading (:mod:`zae_trainer.addons.checkpoint.foreign`): lis2 snapshots and plain
``torch.save`` dicts (``{"model", "optimizer", "epoch"}``) resume; a bare state_dict loads
with ``apply_weights``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any, Iterable, Literal

from ..addon import AddOn
from ..errors import AddOnHookError, NonFiniteLossError, TrainerConfigError
from ..trainer import Trainer
from .checkpoint.async_writer import AsyncWriter, detached_copy
from .checkpoint.atomic import (
    finish_deletions,
    fsync_dir,
    link_atomic,
    mark_for_deletion,
    remove_path,
    remove_stale_temps,
)
from .checkpoint.data_position import (
    ResumePlan,
    capture_epoch_start,
    fast_forward,
    generator_states,
    is_stateful_loader,
    set_generator_states,
)
from .checkpoint.dcp_format import (
    full_model_state_dict,
    is_dcp_checkpoint,
    load_full_model_state_dict,
    read_dcp_checkpoint,
    save_dcp,
)
from .checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
)
from .checkpoint.formats import (
    describe_folder,
    format_of,
    normalise_format,
    read_checkpoint,
    read_weights,
    write_checkpoint,
    write_weights,
)
from .checkpoint.manifest import Entry, Manifest, Monitor
from .checkpoint.schema import apply_checkpoint, build_checkpoint, check_model_fits, upgrade
from .checkpoint.tree import to_plain
from .checkpoint.zae_engine_folder import find_for_load, load_into_trainer

__all__ = ["StateManagerAddon"]

PathLike = str | os.PathLike[str]
MonitorSpec = int | tuple[str, int] | list[Any] | Mapping[str, Any]

DEFAULT_FILENAME = "epoch{epoch:04d}-step{step:07d}"
_NAME_FIELDS = {"epoch": 1, "step": 1, "batch": 1, "reason": "best"}
_FIXED = ("latest", "last", "best")


class _ResumeDataPosition:
    """Strategy: continue a resumed epoch at the exact batch, without loading skipped data."""

    def skip_consumed_batches(self, loader: Iterable[Any], consumed: int) -> Iterable[Any]:
        manager = self.addon_of(StateManagerAddon)  # type: ignore[attr-defined]
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
    save_format : {"ckpt", "safetensors", "dcp"}
        ``"ckpt"``: one ``torch.save`` file, loaded with ``weights_only=True``.
        ``"safetensors"``: a folder of ``.safetensors`` files plus JSON, no pickle at all.
        zae-engine's spelling ``"safetensor"`` is accepted.
        ``"dcp"``: a folder written by every rank through Distributed Checkpoint (each its
        own shards; needed under FSDPAddon), loadable with any number of processes
        (see :mod:`~zae_trainer.addons.checkpoint.dcp_format`).
    keep_top_k : int
        How many best checkpoints by the trainer's monitored metric to keep (``monitor=`` /
        ``monitor_mode=`` of the trainer). 0 keeps none for merit.
    monitors : Mapping or None
        Further "best" criteria, each with its own top-k, e.g.
        ``{"valid/acc": ("max", 1), "valid/f1": {"mode": "max", "top_k": 2}}`` (a bare int is
        a top-k in ``"min"`` mode). A checkpoint chosen by several criteria is one file. Load
        one with ``"best:valid/acc"``; its link is ``best-valid_acc``. "best" alone is always
        the trainer's monitor, the one the run summary and early stopping use.
    keep_last : int
        How many most recent checkpoints to keep besides the best (the newest is always kept).
    keep_periodic : int or None
        How many of the periodic checkpoints (``save_every_n_epochs``) to keep, newest first;
        None keeps all of them. They are not rotated away by ``keep_last``.
    save_last : bool
        Save at the end of every epoch.
    save_every_n_steps : int or None
        Also save every N optimizer steps (mid-epoch). Must be a multiple of the trainer's
        ``log_every_n_steps``: step checkpoints are written when the step's loss is read.
        These are ordinary checkpoints, rotated by ``keep_last``.
    save_every_n_epochs : int or None
        Also save every N epochs, kept by ``keep_periodic``.
    filename : str
        Template of checkpoint names, formatted with ``epoch``, ``step`` (completed counts),
        ``batch`` (batch in the epoch) and ``reason``. Default ``"epoch{epoch:04d}-step{step:07d}"``.
    filename_prefix : str
        Put before every checkpoint name, e.g. ``"resnet50-"``.
    link_best_last : bool
        Keep symbolic links ``best`` and ``last`` (``best.ckpt`` / ``last.ckpt`` for the ckpt
        format) in ``save_path``, pointing at the best and the latest checkpoint, replaced
        atomically after each save; and ``best-<metric>`` for each of ``monitors``.
    save_loss_history : bool
        Also store every step's loss, when the trainer keeps them (the zae-engine
        compatible trainer does). Off by default: it grows with the run.
    save_on_interrupt, save_on_exception : bool
        Write an emergency checkpoint on SIGINT/SIGTERM, or when the run raises while the
        model, optimizer and data position agree (not in the middle of an optimizer update
        or an accumulation group, not after a non-finite loss).
    resume : {"latest", "best"} or path or None
        Restore from this checkpoint when ``run()`` starts. ``"latest"`` / ``"best"`` (or
        ``"best:<metric>"``) start a fresh run if ``save_path`` holds none, and skip a damaged
        file with a warning, trying the next one. A path may also be a lis2 snapshot or a plain
        ``torch.save`` dict holding model, optimizer and epoch.
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
    >>> StateManagerAddon(save_path="ckpts", keep_top_k=3, monitors={"valid/acc": ("max", 1)},
    ...                   save_every_n_epochs=5, keep_periodic=None, filename_prefix="mlp-")  # doctest: +SKIP
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
        save_format: Literal["ckpt", "safetensors", "safetensor", "dcp"] = "ckpt",
        keep_top_k: int = 3,
        monitors: Mapping[str, MonitorSpec] | None = None,
        keep_last: int = 2,
        keep_periodic: int | None = None,
        save_last: bool = True,
        save_every_n_steps: int | None = None,
        save_every_n_epochs: int | None = None,
        filename: str = DEFAULT_FILENAME,
        filename_prefix: str = "",
        link_best_last: bool = True,
        save_loss_history: bool = False,
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
        self.monitors = _monitors(monitors)
        self.keep_last = _count("keep_last", keep_last)
        self.keep_periodic = None if keep_periodic is None else _count("keep_periodic", keep_periodic)
        self.save_last = bool(save_last)
        self.save_every_n_steps = _optional_positive("save_every_n_steps", save_every_n_steps)
        self.save_every_n_epochs = _optional_positive("save_every_n_epochs", save_every_n_epochs)
        self.filename, self.filename_prefix = _check_filename(filename, filename_prefix)
        self.link_best_last = bool(link_best_last)
        self.save_loss_history = bool(save_loss_history)
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
        manifest = self._manifest = self._load_manifest()
        if trainer.is_main_process:
            self._finish_deletions(manifest)
            self._update_links(manifest)

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

    def on_log(self, trainer: Any, metrics: Mapping[str, float]) -> None:
        n = self.save_every_n_steps
        step = trainer.progress_checker.step
        if n is not None and step % n == 0 and step != self._last_step_saved and _trains(trainer):
            if trainer.progress_checker.batch_in_epoch > 0:  # epoch-end logs come after EPOCH_END's save
                self._save(["step"])

    def on_epoch_end(self, trainer: Any) -> None:
        if not _trains(trainer):
            return
        self._writer.wait()
        pc = trainer.progress_checker
        manifest = self._manifest_now()
        reasons = []
        if manifest.would_rank(_finite(trainer.monitored_value()), self.keep_top_k):
            reasons.append("best")
        for m in self.monitors:
            if manifest.would_rank(self._monitored(trainer, m.metric), m.top_k, m.metric, m.mode):
                reasons.append(f"best:{m.metric}")
        if self.save_last:
            reasons.append("last")
        if self.save_every_n_epochs is not None and pc.epoch % self.save_every_n_epochs == 0:
            reasons.append("epoch")
        if reasons:
            self._save(reasons)

    def on_interrupt(self, trainer: Any, signum: int) -> None:
        if not self.save_on_interrupt or not _trains(trainer):
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
        anything else → a ``torch.save`` state dict), then ``save_format``. A sharded (FSDP)
        model is gathered first, a collective: then every rank must call this.
        """
        weights = full_model_state_dict(self.trainer.raw_model)  # model.state_dict() unless sharded
        if not self.trainer.is_main_process:
            return None
        path = os.fspath(filename)
        fmt = "safetensors" if path.endswith((".safetensors", ".safetensor")) else (
            "ckpt" if path.endswith((".ckpt", ".pt", ".pth", ".bin")) else self.save_format
        )
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        write_weights(path, weights, fmt, self._weights_metadata())
        return path

    def export_weights(self, filename: PathLike, source: PathLike | None = None) -> str | None:
        """Write model weights alone to a ``.safetensors`` file, for serving.

        ``source=None`` exports the model as it is now; ``"best"``, ``"latest"`` or a
        checkpoint path exports that checkpoint's weights without touching the model.
        """
        # A sharded (FSDP) model is gathered collectively: then every rank must call this.
        weights = full_model_state_dict(self.trainer.raw_model) if source is None else None
        if not self.trainer.is_main_process:
            return None
        path = os.fspath(filename)
        weights = weights if weights is not None else read_weights(self._resolve(os.fspath(source)))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_weights(path, weights, "safetensors", self._weights_metadata())
        return path

    def apply_weights(self, filename: PathLike | None = None, strict: bool = True) -> None:
        """Load weights into the model, e.g. the best ones before inference or testing.

        ``filename`` may be a weights file, a checkpoint (ours, a lis2 snapshot, a plain
        ``torch.save`` dict or state_dict), or ``"best"`` / ``"latest"`` / ``"best:<metric>"``
        (from the manifest). ``None`` loads the best checkpoint in ``save_path`` (a trainer
        that keeps zae-engine's in-memory ``weight_buffer`` uses that instead). A sharded
        (FSDP) model: every rank must call it; each reads the weights, and the load is a collective.
        """
        trainer = self.trainer
        buffered = [w for w in (getattr(trainer, "weight_buffer", None) or {}).get("weight", []) if w is not None]
        if filename is None and buffered:
            weights, source = buffered[-1], "in-memory best weights"
        else:
            source = self._resolve("best" if filename is None else os.fspath(filename))
            weights = read_weights(source)
        fitting = check_model_fits(trainer.raw_model, weights, source, strict)
        load_full_model_state_dict(trainer.raw_model, fitting, strict)  # sharded (FSDP): every rank calls this

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
        if self.save_format == "dcp":  # sharded: every rank writes its part (see checkpoint.dcp_format)
            return save_dcp(self, reasons, wait_for_write)
        if not trainer.is_main_process:
            return None
        self._writer.wait()
        manifest = self._manifest_now()
        pc = trainer.progress_checker
        checkpoint = build_checkpoint(
            trainer, reasons=reasons, data_position=self._data_position(), model_config=self.model_config,
            save_loss_history=self.save_loss_history,
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
            """Write, then make visible; return the dropped checkpoints, already renamed to marked names."""
            write_checkpoint(path, checkpoint, self.save_format)
            entry.size = os.path.getsize(path) if os.path.isfile(path) else None
            manifest.add(entry)
            dropped = manifest.retain(self.keep_last, self._retention_monitors(), self.keep_periodic)
            self._update_links(manifest)  # before any deletion: a link never points at a dropped file
            marked = [mark_for_deletion(os.path.join(self.save_path, old.name)) for old in dropped]
            manifest.write()
            return marked

        def delete(paths: list[str]) -> None:
            for old in paths:
                remove_path(old)

        if self.async_save and not wait_for_write:
            checkpoint = detached_copy(checkpoint, self._writer.pool)
            self._writer.submit(path, lambda: delete(publish()))
            return path
        marked = publish()
        if marked:  # removing a large file can take longer than writing one: not on the loop's time
            self._writer.submit(f"deletion of {marked}", lambda: delete(marked))
        return path

    def _retention_monitors(self) -> list[Monitor]:
        return [Monitor(None, self.trainer.monitor_mode, self.keep_top_k), *self.monitors]

    def _monitored(self, trainer: Any, metric: str) -> float | None:
        """This epoch's value of an extra monitor; None on an epoch that did not run its phase."""
        metrics = trainer.epoch_metrics
        if metric in metrics:
            return _finite(metrics[metric])
        phase = metric.split("/", 1)[0] + "/"
        if any(name.startswith(phase) for name in metrics):  # the phase ran but has no such metric
            raise TrainerConfigError(
                f"StateManagerAddon(monitors=...) ranks checkpoints by {metric!r}, which the epoch did not produce "
                f"(it has {sorted(metrics)}). To fix, name one of those in monitors=."
            )
        return None

    # -- fixed names and unfinished deletions ---------------------------------------------
    def _update_links(self, manifest: Manifest) -> None:
        """Point ``best``/``last``/``best-<metric>`` at the manifest's choices (atomic replace)."""
        if not self.link_best_last or not self.trainer.is_main_process:
            return
        targets = {"best": manifest.best(), "last": manifest.latest()}
        for m in self.monitors:
            targets[f"best-{_slug(m.metric)}"] = manifest.best(m.metric, m.mode)
        suffix = format_of(self.save_format).suffix
        changed = False
        for which, entry in targets.items():
            link = os.path.join(self.save_path, which + suffix)
            try:  # one system call tells all three cases apart
                current: str | None = os.readlink(link)
            except FileNotFoundError:
                current = None
            except OSError:  # there, but not a symbolic link (found when the add-on starts)
                raise CheckpointError(
                    f"{link!r} exists and is not a link; StateManagerAddon keeps a link to the {which} checkpoint "
                    "there. To fix, move that file, or pass link_best_last=False.",
                    link,
                ) from None
            if entry is None:
                if current is not None:
                    os.remove(link)
                    changed = True
                continue
            if current == entry.name:
                continue
            try:
                link_atomic(link, entry.name, durable=False)
            except OSError as exc:  # a file system without symbolic links
                self.link_best_last = False
                warnings.warn(
                    f"cannot create the link {link!r} ({exc}); best/last links are off for this run. The manifest "
                    "still names them: use load_state('best') or read manifest.json.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
            changed = True
        if changed:
            fsync_dir(self.save_path)

    def _finish_deletions(self, manifest: Manifest) -> None:
        """Complete deletions a killed process left half done; forget what they removed."""
        finished = finish_deletions(self.save_path)
        gone = [n for n in finished if not os.path.lexists(os.path.join(self.save_path, n))]
        if gone and manifest.forget(gone):
            manifest.write()

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
        base = self.filename_prefix + self.filename.format(
            epoch=pc.epoch, step=pc.step, batch=pc.batch_in_epoch, reason=reasons[0]
        )
        if pc.batch_in_epoch and "{batch" not in self.filename:
            base += f"-batch{pc.batch_in_epoch:05d}"
        if reasons[0] in ("interrupt", "exception") and "{reason" not in self.filename:
            base += f"-{reasons[0]}"
        suffix = format_of(self.save_format).suffix
        taken = {e.name for e in manifest.entries}
        name, n = base + suffix, 1
        while name in taken or os.path.lexists(os.path.join(self.save_path, name)):
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
        if _raised_in_optimizer_update(exc) or original is not exc and _raised_in_optimizer_update(original):
            return "the error came during an optimizer update, which may be half applied"
        if trainer.progress_checker.batch_in_epoch % trainer.accumulate_grad_batches:
            return "the error came inside a gradient-accumulation group"
        return None

    def _manifest_now(self) -> Manifest:
        if self._manifest is None:
            self._manifest = self._load_manifest()
        return self._manifest

    def _load_manifest(self) -> Manifest:
        return Manifest.load(self.save_path, mode=self.trainer.monitor_mode, monitors=self.monitors)

    # ==================================================================================
    # Loading
    # ==================================================================================
    def _resolve(self, source: str) -> str:
        """A path for ``source``: ``"best"``/``"best:<metric>"``/``"latest"``/``"last"`` from the manifest, else the path."""
        if _is_named(source):
            self._writer.wait()
            candidates = self._load_manifest().candidates(_which(source))
            if not candidates:
                raise CheckpointNotFoundError(
                    f"no {source} checkpoint: {os.path.join(self.save_path, 'manifest.json')!r} lists none; "
                    f"{describe_folder(self.save_path)}",
                    self.save_path,
                )
            return os.path.join(self.save_path, candidates[0].name)
        if not os.path.exists(source) and os.path.exists(os.path.join(self.save_path, source)):
            return os.path.join(self.save_path, source)
        return source

    def _read(self, path: str) -> dict[str, Any]:
        """Read a checkpoint for loading; foreign files that hold enough to resume are accepted."""
        if is_dcp_checkpoint(path):  # loads model and optimizer in place, resharded to this run's ranks
            return read_dcp_checkpoint(path, self.trainer, self.strict)
        return read_checkpoint(path, foreign=True)

    def _load(self, source: str, strict: bool, fresh_if_empty: bool) -> str | None:
        self._writer.wait()
        if not _is_named(source):
            path = self._resolve(source)
            legacy = find_for_load(path)
            if legacy is not None:  # a folder zae-engine wrote (model.ckpt, optimizer.zae, ...)
                self._plan = None
                return load_into_trainer(self.trainer, legacy, strict)
            self._plan = apply_checkpoint(self.trainer, self._read(path), path, strict)
            return path
        manifest = self._load_manifest()
        candidates = manifest.candidates(_which(source))
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
                checkpoint = upgrade(self._read(path), path)
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


def _raised_in_optimizer_update(exc: BaseException) -> bool:
    """Whether ``exc`` came from inside the trainer's optimizer phase: its ``BEFORE_OPTIMIZER_STEP``
    hooks, the step, ``AFTER_OPTIMIZER_STEP`` hooks, a per-step scheduler or ``zero_grad``.

    Read from the traceback once a run fails, so the loop pays nothing per step for it (no
    hooks that only set a flag).
    """
    phases = (Trainer._optimizer_phase.__code__, Trainer._optimizer_phase_several.__code__)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in phases:
            return True
        tb = tb.tb_next
    return False


def _is_named(source: str) -> bool:
    return source in _FIXED or source.startswith("best:")


def _which(source: str) -> str:
    return "latest" if source == "last" else source


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


def _slug(metric: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in metric)


def _monitors(given: Mapping[str, MonitorSpec] | None) -> list[Monitor]:
    """Parse ``monitors=``: ``{metric: top_k | (mode, top_k) | {"mode", "top_k"}}``."""
    if given is None:
        return []
    if not isinstance(given, Mapping):
        raise TypeError(
            f"monitors must be a mapping of metric name to (mode, top_k), got {type(given).__name__}. "
            'For example monitors={"valid/acc": ("max", 1)}.'
        )
    found: list[Monitor] = []
    for metric, spec in given.items():
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"mode", "top_k"}
            if unknown:
                raise ValueError(f"monitors[{metric!r}]: unknown keys {sorted(unknown)}; expected 'mode' and 'top_k'")
            mode, top_k = spec.get("mode", "min"), spec.get("top_k", 1)
        elif isinstance(spec, (tuple, list)) and len(spec) == 2:
            mode, top_k = spec
        elif isinstance(spec, int) and not isinstance(spec, bool):
            mode, top_k = "min", spec
        else:
            raise ValueError(
                f"monitors[{metric!r}] must be top_k, (mode, top_k) or {{'mode': ..., 'top_k': ...}}, got {spec!r}"
            )
        if not isinstance(metric, str) or "/" not in metric:
            raise ValueError(f"monitors: {metric!r} is not a metric name like 'valid/acc' (phase/name)")
        if mode not in ("min", "max"):
            raise ValueError(f"monitors[{metric!r}]: mode must be 'min' or 'max', got {mode!r}")
        found.append(Monitor(metric, mode, _count(f"monitors[{metric!r}] top_k", top_k)))
    return found


def _check_filename(template: str, prefix: str) -> tuple[str, str]:
    """Fail now, not at the first save, on a template that does not format to a plain name."""
    if not isinstance(template, str) or not isinstance(prefix, str):
        raise TypeError("filename and filename_prefix must be strings")
    try:
        sample = prefix + template.format(**_NAME_FIELDS)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"filename={template!r} does not format: {type(exc).__name__}: {exc}. It may use the fields "
            f"{sorted(_NAME_FIELDS)}, e.g. {DEFAULT_FILENAME!r}."
        ) from None
    bad = [c for c in ("/", os.sep, "\0") if c in sample]
    if not sample or sample.startswith(".") or bad or sample in ("manifest.json", *_FIXED) or sample.startswith("best-"):
        raise ValueError(
            f"filename_prefix + filename gives {sample!r}, which is not usable as a checkpoint name (empty, hidden, "
            "a path, or a reserved name: manifest.json, best, last, best-*). To fix, choose a plain name such as "
            f"{DEFAULT_FILENAME!r} with an optional prefix."
        )
    return template, prefix


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


def _trains(trainer: Any) -> bool:
    """Whether this is a training run (``run_kind``; ``mode`` on trainers from before the lean core)."""
    kind = getattr(trainer, "run_kind", None)
    return (kind if kind is not None else trainer.mode) == "train"
