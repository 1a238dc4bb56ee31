"""Checkpoints written by other trainers: lis2 snapshots and plain ``torch.save`` dicts.

Every file is read through the same safe loading as our own (``torch.load(weights_only=True)``):
tensors and plain containers only, so a foreign file can never run code. What is
recognised:

lis2 snapshot
    ``{MODEL: {"config": ..., "state": state_dict}, TRAIN_INFO: {"epochs_run": int,
    "best_loss": float, "optimizer": state, "scheduler": state}, GLOBAL_CONFIG: {...}}`` with
    the keys :data:`MODEL`, :data:`TRAIN_INFO` and :data:`GLOBAL_CONFIG`.
plain dict
    ``{"model": state_dict, "optimizer": ..., "epoch": ...}``; the spellings of PyTorch's
    tutorials are accepted too (``model_state_dict``, ``optimizer_state_dict``, ``state_dict``,
    ``scheduler``/``lr_scheduler``, ``step``/``global_step``).
bare state_dict
    ``{name: tensor}``: weights only.

Weights load from any of them (:func:`foreign_weights`). A file resumes training
(:func:`resumable_checkpoint`) when it holds the model, the optimizer state and an epoch
count; the epoch is taken as *epochs completed*. RNG states, the data position and metric
history are not in such files, so a resumed run continues from the next epoch boundary with
fresh random streams.

:func:`as_lis2` gives lis2's layout of one of our checkpoints.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["MODEL", "TRAIN_INFO", "GLOBAL_CONFIG", "as_lis2", "describe", "foreign_weights", "resumable_checkpoint"]

# lis2's snapshot keys. lis2's own source was not available to check the constants' values;
# these are the names its layout is described with.
MODEL = "MODEL"
TRAIN_INFO = "TRAIN_INFO"
GLOBAL_CONFIG = "GLOBAL_CONFIG"

_MODEL_KEYS = ("model", "model_state_dict", "state_dict")
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim")
_SCHEDULER_KEYS = ("scheduler", "scheduler_state_dict", "lr_scheduler")
_EPOCH_KEYS = ("epoch", "epochs_run", "epochs")
_STEP_KEYS = ("step", "global_step")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _first(obj: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if obj.get(key) is not None:
            return obj[key]
    return None


def _is_lis2(obj: Any) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get(MODEL), Mapping) and "state" in obj[MODEL]


def describe(obj: Any) -> str:
    """A short description of what a loaded file holds, for error messages."""
    if _is_lis2(obj):
        return "a lis2 snapshot"
    if _is_state_dict(obj):
        return f"a plain state_dict of {len(obj)} tensors (weights only)"
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:12]) + (", ..." if len(obj) > 12 else "")
        return f"a dict with keys {keys}"
    return f"a {type(obj).__name__}"


def foreign_weights(obj: Any) -> dict[str, torch.Tensor] | None:
    """The model weights in a foreign file's contents, or None if there are none to find."""
    if _is_state_dict(obj):
        return dict(obj)
    if _is_lis2(obj):
        state = obj[MODEL]["state"]
        return dict(state) if _is_state_dict(state) else None
    if isinstance(obj, Mapping):
        model = _first(obj, _MODEL_KEYS)
        if _is_state_dict(model):
            return dict(model)
    return None


def resumable_checkpoint(obj: Any, path: str) -> dict[str, Any] | None:
    """A partial checkpoint (our schema) from a foreign file that can resume, else None."""
    weights = foreign_weights(obj)
    if weights is None or not isinstance(obj, Mapping):
        return None
    if _is_lis2(obj):
        info = obj.get(TRAIN_INFO) or {}
        optimizer, scheduler = info.get("optimizer"), info.get("scheduler")
        epoch, step = info.get("epochs_run"), info.get("global_step")
        config, model_config, kind = obj.get(GLOBAL_CONFIG) or {}, obj[MODEL].get("config"), "lis2"
    else:
        optimizer, scheduler = _first(obj, _OPTIMIZER_KEYS), _first(obj, _SCHEDULER_KEYS)
        epoch, step = _first(obj, _EPOCH_KEYS), _first(obj, _STEP_KEYS)
        config, model_config, kind = obj.get("config") or {}, None, "plain"
    if not isinstance(optimizer, Mapping) or isinstance(epoch, bool) or not isinstance(epoch, int):
        return None
    if step is None:
        warnings.warn(
            f"{path!r} ({kind}) holds no step count; the trainer's step counter restarts at 0 (the optimizer and "
            "scheduler keep their own counts).",
            RuntimeWarning,
            stacklevel=4,
        )
    return {
        "format_version": 0,
        "foreign": kind,
        "model": weights,
        "model_config": dict(model_config) if isinstance(model_config, Mapping) else None,
        "optimizer": dict(optimizer),
        "scheduler": dict(scheduler) if isinstance(scheduler, Mapping) else None,
        "progress": {"epoch": int(epoch), "step": int(step or 0), "batch_in_epoch": 0},
        "config": dict(config) if isinstance(config, Mapping) else {},
    }


def as_lis2(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """lis2's snapshot layout of one of our checkpoints (or of a converted foreign one)."""
    progress = checkpoint.get("progress") or {}
    best = checkpoint.get("best") or {}
    return {
        MODEL: {"config": checkpoint.get("model_config"), "state": checkpoint["model"]},
        TRAIN_INFO: {
            "epochs_run": int(progress.get("epoch", 0)),
            "best_loss": best.get("value"),
            "optimizer": checkpoint.get("optimizer"),
            "scheduler": checkpoint.get("scheduler"),
        },
        GLOBAL_CONFIG: dict(checkpoint.get("config") or {}),
    }
