"""zae-engine's ``StateManagerAddon``: one folder holding the best state, zae-engine's layout.

``save_path`` holds ``model.ckpt`` (or ``model.safetensor`` with ``save_format="safetensor"``),
``optimizer.zae`` and ``scheduler.zae``, rewritten at every epoch that improves the monitored
loss (zae-engine's ``check_better``) and by ``save_state()``; ``load_state()`` reads them back.

Fixed from zae-engine: every file is replaced atomically (a crash leaves the previous one);
``.zae`` files are read without running code from them (see
:mod:`zae_trainer.addons.checkpoint.zae_engine_folder`); ``scheduler=None`` is allowed (no
``scheduler.zae`` is written); ``load_state()`` on a folder with nothing to load raises instead
of silently doing nothing. For complete, resumable checkpoints (progress, RNG, data position,
``resume=``), use the core :class:`zae_trainer.addons.StateManagerAddon`.
"""

from __future__ import annotations

import os
from typing import Any

from ...addon import AddOn
from ...addons.checkpoint import zae_engine_folder as folder_io
from ...addons.checkpoint.errors import CheckpointNotFoundError
from .._trainer import ZaeEngineLayer

__all__ = ["StateManagerAddon"]

_FORMATS = {"ckpt": "ckpt", "safetensor": "safetensor", "safetensors": "safetensors"}


class StateManagerAddon(AddOn):
    """Save and load the model, optimizer and scheduler in zae-engine's folder layout.

    Parameters
    ----------
    save_path : str
        Folder for ``model.<save_format>``, ``optimizer.zae`` and ``scheduler.zae`` (created).
    save_format : {"ckpt", "safetensor"}
        ``torch.save`` weights (``model.ckpt``) or safetensors (``model.safetensor``).

    Examples
    --------
    >>> MyTrainer.add_on(StateManagerAddon)(model, device, "train", optimizer, scheduler,
    ...                                     save_path="./checkpoints")  # doctest: +SKIP
    """

    name = "zae_engine_state_manager"
    runs_after = (ZaeEngineLayer.name,)  # saves after check_better decided
    exports = ("save_state", "load_state", "save_model", "save_optimizer", "save_scheduler", "save_result")
    #: trainer attribute -> this add-on's attribute (zae-engine set them on the trainer)
    trainer_attributes = {"save_path": "save_path", "save_format": "save_format"}

    def __init__(self, *, save_path: str | os.PathLike[str], save_format: str = "ckpt") -> None:
        if save_format not in _FORMATS:
            raise ValueError(f"save_format must be 'ckpt' or 'safetensor', got {save_format!r}")
        self.save_path = os.fspath(save_path)
        self.save_format = save_format

    def setup(self, trainer: Any) -> None:
        if trainer.is_main_process:
            os.makedirs(self.save_path, exist_ok=True)

    def on_epoch_end(self, trainer: Any) -> None:
        layer = trainer.addon_of(ZaeEngineLayer)
        if layer is not None and layer.improved:
            self.save_state()

    # -- exported to the trainer (zae-engine's names) -----------------------------------
    def save_state(self) -> None:
        """Write the model, optimizer and scheduler state into ``save_path``."""
        trainer = self.trainer
        if not trainer.is_main_process:
            return
        folder_io.write(
            self.save_path,
            trainer.raw_model.state_dict(),
            trainer.optimizer.state_dict() if trainer.optimizer is not None else None,
            trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
            self.save_format,
        )

    def load_state(self, path: str | os.PathLike[str] | None = None, strict: bool = True) -> None:
        """Load the model, optimizer and scheduler from ``path`` (default ``save_path``).

        Raises ``CheckpointNotFoundError`` when the folder holds none of the files.
        """
        source = self.save_path if path is None else os.fspath(path)
        found = folder_io.find(source, self.save_format)
        if found is None:
            from ...addons.checkpoint.formats import describe_folder

            raise CheckpointNotFoundError(
                f"load_state: {source!r} holds no zae-engine state (model.ckpt / model.safetensor, optimizer.zae, "
                f"scheduler.zae); {describe_folder(source)}",
                source,
            )
        trainer = self.trainer
        folder_io.load_into(found, trainer.raw_model, trainer.optimizer, trainer.scheduler, strict)

    def save_model(self, filename: str | os.PathLike[str]) -> None:
        """Write the model's weights to ``filename`` in ``save_format``."""
        import torch

        weights = {k: v.detach().cpu().contiguous() for k, v in self.trainer.raw_model.state_dict().items()}
        if self.save_format == "ckpt":
            torch.save(weights, os.fspath(filename))
        else:
            from safetensors.torch import save_file

            save_file(folder_io._unshared(weights), os.fspath(filename))

    def save_optimizer(self) -> None:
        """Write ``optimizer.zae`` alone."""
        opt = self.trainer.optimizer
        if opt is not None:
            folder_io.write_state(os.path.join(self.save_path, folder_io.OPTIMIZER_FILE), opt.state_dict())

    def save_scheduler(self) -> None:
        """Write ``scheduler.zae`` alone (nothing without a scheduler)."""
        sched = self.trainer.scheduler
        if sched is not None:
            folder_io.write_state(os.path.join(self.save_path, folder_io.SCHEDULER_FILE), sched.state_dict())

    def save_result(self) -> None:
        """zae-engine's placeholder; it saved nothing, and neither does this."""
