"""The checkpoint schema (format version 2): what a checkpoint holds and how it is applied.

Top-level keys (both formats hold the same tree)::

    format            "zae_trainer.checkpoint"
    format_version    2
    model             the unwrapped model's state_dict (no "module." prefixes)
    model_config      optional plain dict describing the model (model_config= setting,
                      else the model's own ``config`` mapping / ``to_dict()``), or None
    optimizer         optimizer.state_dict() or None
    scheduler         scheduler.state_dict() or None
    progress          ProgressChecker counters: step, batches, epoch, samples, batch_in_epoch, ...
    history           per-epoch metrics, one dict per finished epoch
    best              {"metric", "value", "epoch"}: the best monitored value so far
    metrics           the metric accumulators' state (a mid-epoch resume continues their sums)
    addons            {add-on name: its state_dict()}  (the GradScaler lives in the
                      precision add-on's entry)
    rng               python / numpy / torch CPU / every CUDA device, keys as hex text (see rng.py)
    data_position     batch_in_epoch, the epoch-start RNG and loader-generator states,
                      the loaders' generator states now, a stateful loader's own state
    config            the run's config and hyperparameters (Trainer(config=...))
    trainer_settings  monitor, monitor_mode, accumulate_grad_batches, log_every_n_steps, world_size
    versions          zae_trainer, torch, python, numpy, safetensors
    saved_at          {"unix": seconds, "iso": ISO-8601 UTC}
    reasons           why it was written: "best", "last", "step", "epoch", "interrupt", ...
    loss_history      only with ``save_loss_history=True`` and a trainer that keeps one:
                      {"train": [...], "test": [...]}, every step's loss so far
    (anything else the trainer's state_dict() holds, and keys add-ons add on CHECKPOINT_SAVE)

Version 1 (zae_trainer before the lean core) also held ``loss_history`` always and a
``training_info`` block repeating progress and best; :func:`upgrade` reads it as version 2
(``loss_history`` is kept for a trainer that restores it, ``training_info`` is dropped:
:func:`as_snapshot` derives it). Files written by other trainers (format version 0 here)
come from :mod:`.foreign`.

:func:`as_snapshot` gives a snapshot view (model state and config, training info,
optimizer, scheduler, global config) of any checkpoint, in our key names or lis2's.
"""

from __future__ import annotations

import datetime as _dt
import functools
import platform
import time
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .data_position import ResumePlan
from .errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError
from .foreign import as_lis2
from .formats import SCHEMA_NAME
from .rng import capture_rng, restore_rng
from .tree import to_plain

if TYPE_CHECKING:  # pragma: no cover
    from ...trainer import Trainer

__all__ = [
    "FORMAT_VERSION",
    "SCHEMA_NAME",
    "build_checkpoint",
    "apply_checkpoint",
    "as_snapshot",
    "model_config_of",
    "upgrade",
]

FORMAT_VERSION = 2
_SHOWN = 10


def versions() -> dict[str, str]:
    """The versions a checkpoint records; read once per process (they cannot change in one)."""
    return dict(_versions())


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    from ... import __version__

    # str(): torch.__version__ is a str subclass, which a checkpoint could only hold pickled
    found = {"zae_trainer": str(__version__), "torch": str(torch.__version__), "python": platform.python_version()}
    for name in ("numpy", "safetensors"):
        try:
            found[name] = str(__import__(name).__version__)
        except Exception:  # optional packages: record what is there
            continue
    return tuple(found.items())


def model_config_of(model: torch.nn.Module, given: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The model's configuration: the ``model_config=`` setting, else ``model.config`` if plain."""
    if given is not None:
        return dict(given)
    config = getattr(model, "config", None)
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else None


def build_checkpoint(
    trainer: "Trainer",
    *,
    reasons: list[str],
    data_position: dict[str, Any],
    model_config: Mapping[str, Any] | None,
    save_loss_history: bool = False,
) -> dict[str, Any]:
    """Everything needed to continue the run exactly, as tensors and plain values."""
    state = dict(trainer.state_dict())
    if not save_loss_history:
        state.pop("loss_history", None)
    now = time.time()
    checkpoint: dict[str, Any] = {
        "format": SCHEMA_NAME,
        "format_version": FORMAT_VERSION,
        **state,
        "model_config": model_config_of(trainer.raw_model, model_config),
        "rng": capture_rng(),
        "data_position": data_position,
        "config": dict(trainer.config),
        "trainer_settings": {
            "monitor": trainer.monitor_name(),
            "monitor_mode": trainer.monitor_mode,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "log_every_n_steps": trainer.log_every_n_steps,
            "world_size": trainer.world_size,
        },
        "versions": versions(),
        "saved_at": {"unix": now, "iso": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat()},
        "reasons": list(reasons),
    }
    from ...events import Event

    built_plain = {key: checkpoint[key] for key in _BUILT_PLAIN if key in checkpoint}
    trainer.emit(Event.CHECKPOINT_SAVE, checkpoint)  # add-ons may add keys of their own
    model = checkpoint.pop("model")
    # Parts this function and the core built from numbers and strings need no check; the
    # rest (optimizer, scheduler, config, add-on states, anything an add-on put in) does.
    # A part an add-on replaced on CHECKPOINT_SAVE is no longer the object built here: checked.
    unchecked = {k: v for k, v in checkpoint.items() if built_plain.get(k, _NOTHING) is not v}
    plain = {**checkpoint, **to_plain(unchecked)}
    plain["model"] = model
    return plain


#: top-level parts made of plain values only, by build_checkpoint and Trainer.state_dict
_BUILT_PLAIN = ("format", "format_version", "metrics", "seconds", "rng", "versions", "saved_at")
_NOTHING = object()


_REQUIRED = {"model": Mapping, "progress": Mapping, "rng": Mapping}


def upgrade(checkpoint: dict[str, Any], source: str) -> dict[str, Any]:
    """``checkpoint`` as the current version; raise if it is newer than this code or malformed.

    Version 1 loses ``training_info`` (derived data); foreign files (version 0) pass as they are.
    """
    version = checkpoint.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source!r} has checkpoint format version {version!r}; this zae_trainer reads versions up to "
            f"{FORMAT_VERSION}. To fix, upgrade zae_trainer.",
            source,
        )
    required = dict(_REQUIRED)
    if version == 0:  # a foreign file: no RNG states to restore
        required.pop("rng")
    for key, kind in required.items():
        if not isinstance(checkpoint.get(key), kind):
            raise CheckpointCorruptError(
                f"{source!r} is damaged: its {key!r} entry is {type(checkpoint.get(key)).__name__}, not a mapping",
                source,
            )
    if version == 1:
        checkpoint = {k: v for k, v in checkpoint.items() if k != "training_info"}
        checkpoint["format_version"] = FORMAT_VERSION
    return checkpoint


def _model_mismatch(own: Mapping[str, torch.Tensor], saved: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    reshaped = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in saved and isinstance(saved[k], torch.Tensor) and tuple(saved[k].shape) != tuple(own[k].shape)
    ]
    return missing, unexpected, reshaped


def _listing(label: str, keys: list[str]) -> str:
    more = f" ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"{label} ({len(keys)}): {', '.join(keys[:_SHOWN])}{more}"


def check_model_fits(model: torch.nn.Module, weights: Mapping[str, Any], source: str, strict: bool) -> dict[str, Any]:
    """The weights that can be loaded; raise (strict) or warn (not strict) about the rest."""
    own = model.state_dict()
    missing, unexpected, reshaped = _model_mismatch(own, weights)
    if not (missing or unexpected or reshaped):
        return dict(weights)
    parts = [_listing(lbl, keys) for lbl, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", reshaped)) if keys]
    detail = "; ".join(parts)
    if strict:
        raise CheckpointMismatchError(
            f"{source!r} was saved from a different model: {detail}. To fix, build the same model "
            "architecture, or pass strict=False to load only the matching weights.",
            source,
        )
    warnings.warn(f"loading {source!r} with strict=False skips {detail}", RuntimeWarning, stacklevel=3)
    bad = {r.split(":", 1)[0] for r in reshaped}
    return {k: v for k, v in weights.items() if k in own and k not in bad}


def apply_checkpoint(trainer: "Trainer", checkpoint: dict[str, Any], source: str, strict: bool = True) -> ResumePlan:
    """Restore the trainer (and the global RNGs) from ``checkpoint``; return its data position."""
    checkpoint = upgrade(checkpoint, source)
    weights = check_model_fits(trainer.raw_model, checkpoint["model"], source, strict)
    try:
        trainer.load_state_dict({**checkpoint, "model": weights}, strict=strict)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointMismatchError(
            f"could not restore {source!r}: {type(exc).__name__}: {exc}. The optimizer, scheduler or add-ons "
            "differ from the run that saved it; to load the weights alone use trainer.apply_weights(path).",
            source,
        ) from exc
    if "rng" in checkpoint:
        restore_rng(checkpoint["rng"])
    from ...events import Event

    trainer.emit(Event.CHECKPOINT_LOAD, checkpoint)
    position = checkpoint.get("data_position") or {}
    return ResumePlan(
        batch_in_epoch=int(checkpoint["progress"].get("batch_in_epoch", 0)),
        epoch_start=position.get("epoch_start"),
        generators=dict(position.get("generators") or {}),
        loader_state=position.get("loader_state"),
    )


def as_snapshot(checkpoint: Mapping[str, Any], layout: str = "zae_trainer") -> dict[str, Any]:
    """A snapshot view of a checkpoint: model state and config, training info, optimizer, scheduler, config.

    ``layout="zae_trainer"`` returns ``{"model_state", "model_config", "training_info":
    {"epoch", "epochs_run", "global_step", "best_loss", "best_epoch", "monitor"},
    "optimizer_state", "scheduler_state", "global_config"}``. ``layout="lis2"`` returns lis2's
    ``{MODEL: {"config", "state"}, TRAIN_INFO: {"epochs_run", "best_loss", "optimizer",
    "scheduler"}, GLOBAL_CONFIG: {...}}`` (see :mod:`.foreign` for the key names).
    """
    if layout == "lis2":
        return as_lis2(checkpoint)
    if layout != "zae_trainer":
        raise ValueError(f"layout must be 'zae_trainer' or 'lis2', got {layout!r}")
    progress = checkpoint.get("progress") or {}
    best = checkpoint.get("best") or {}
    settings = checkpoint.get("trainer_settings") or {}
    epochs = int(progress.get("epoch", 0))
    info = {
        "epoch": epochs,
        "epochs_run": epochs,
        "global_step": int(progress.get("step", 0)),
        "best_loss": best.get("value"),
        "best_epoch": best.get("epoch"),
        "monitor": best.get("metric") or settings.get("monitor"),
    }
    return {
        "model_state": checkpoint["model"],
        "model_config": checkpoint.get("model_config"),
        "training_info": info,
        "optimizer_state": checkpoint.get("optimizer"),
        "scheduler_state": checkpoint.get("scheduler"),
        "global_config": checkpoint.get("config", {}),
    }
