"""Every check the core makes of what users give it: settings, ``run()`` arguments, step outputs,
the monitored metric. One module, so that the loop reads as a loop and the errors read alike.

Each check raises an error that names what was wrong, where, and how to fix it. None of the
per-step checks reads a tensor's value, so none synchronises host and device.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from .errors import StepOutputError, TrainerConfigError
from .slurm import refuse_independent_tasks

__all__ = [
    "RUN_KINDS",
    "is_better",
    "positive_int",
    "choice",
    "loader_length",
    "batch_size",
    "check_run_kind",
    "check_optimizer",
    "check_run_arguments",
    "check_train_outputs",
    "check_eval_outputs",
    "check_monitor",
]

#: What ``Trainer(mode=...)`` accepts: the run kind, fixed for the trainer's life.
RUN_KINDS: tuple[str, ...] = ("train", "test")


def is_better(value: float, best: float | None, mode: str) -> bool:
    """The one rule for "best", shared by the trainer, checkpoint ranking and early stopping.

    A new value must be *strictly* better than the best so far; on ties the earliest epoch
    stays best (accuracy monitors tie often, and moving "best" to a later equal epoch would
    make the trainer, the manifest and early stopping disagree about which epoch it is).

    Examples
    --------
    >>> is_better(0.5, None, "min"), is_better(0.5, 0.5, "min"), is_better(0.6, 0.5, "max")
    (True, False, True)
    """
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainerConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def choice(name: str, value: Any, allowed: Sequence[str]) -> Any:
    if value not in allowed:
        raise TrainerConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def loader_length(loader: Any) -> int | None:
    """Batches in ``loader``, or None for an iterable without a length."""
    try:
        return len(loader)
    except TypeError:
        return None


def batch_size(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor (1 if it has none)."""
    if type(batch) is tuple and batch and type(batch[0]) is torch.Tensor:  # the common (inputs, targets) case
        shape = batch[0].shape
        return shape[0] if shape else 1
    stack = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            return int(item.shape[0]) if item.dim() > 0 else 1
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return 1


def check_run_kind(mode: str) -> Literal["train", "test"]:
    if mode not in RUN_KINDS:
        raise TrainerConfigError(
            f"mode must be 'train' or 'test', got {mode!r}. 'train' trains (and validates); 'test' only "
            "evaluates the loader given to run()."
        )
    return "train" if mode == "train" else "test"


def check_optimizer(model: nn.Module, optimizer: Any, run_kind: str) -> None:
    if optimizer is None:
        if run_kind == "train":
            raise TrainerConfigError(
                "mode='train' needs an optimizer, e.g. optimizer=torch.optim.Adam(model.parameters()). "
                "Use mode='test' to only evaluate."
            )
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    model_params = {id(p) for p in model.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if model_params and not any(id(p) in model_params for p in held):
        raise TrainerConfigError(
            "the optimizer holds none of the model's parameters, so training would change nothing. "
            "Create it from this model, e.g. torch.optim.SGD(model.parameters(), lr=0.1), after any "
            "re-creation of the model."
        )


def check_run_arguments(
    n_epoch: Any, loader: Any, valid_loader: Any, devices: Sequence[torch.device], world_size: int
) -> None:
    if isinstance(n_epoch, bool) or not isinstance(n_epoch, int) or n_epoch < 1:
        raise TrainerConfigError(f"n_epoch must be an integer >= 1, got {n_epoch!r}")
    if len(devices) > 1 and world_size == 1:
        raise TrainerConfigError(
            f"{len(devices)} devices were given ({[str(d) for d in devices]}) but no add-on "
            "distributes the work. Add MultiGPUAddon, or pass a single device."
        )
    refuse_independent_tasks(world_size)  # N srun tasks, each a one-process trainer
    for name, value in (("loader", loader), ("valid_loader", valid_loader)):
        if value is None:
            if name == "loader":
                raise TrainerConfigError("run() needs a loader, e.g. a torch.utils.data.DataLoader")
            continue
        if not hasattr(value, "__iter__"):
            raise TypeError(f"{name} must be iterable (a DataLoader), got {type(value).__name__}")
        if loader_length(value) == 0:
            raise TrainerConfigError(
                f"{name} is empty (0 batches). Check the dataset's length, and drop_last=True with a "
                "dataset smaller than the batch size."
            )


def check_train_outputs(outputs: Any, step: int) -> torch.Tensor:
    """``train_step``'s result must be a dict with a scalar ``"loss"`` that has a graph.

    Python-side checks only: none of them reads a tensor's value.
    """
    if type(outputs) is not dict and not isinstance(outputs, Mapping):
        raise StepOutputError(
            f"train_step must return a dict such as {{'loss': loss}}, got {type(outputs).__name__} at step {step}"
        )
    if "loss" not in outputs:
        raise StepOutputError(
            f"train_step's dict has no 'loss' (keys: {sorted(outputs)}) at step {step}; the loop calls "
            "backward on outputs['loss']"
        )
    loss = outputs["loss"]
    if not isinstance(loss, torch.Tensor):
        raise StepOutputError(
            f"train_step's 'loss' must be a tensor, got {type(loss).__name__} at step {step}; compute it "
            "with torch operations on the model's output"
        )
    if loss.numel() != 1:
        raise StepOutputError(
            f"train_step's 'loss' must be a scalar, got shape {tuple(loss.shape)} at step {step}; reduce it "
            "(e.g. loss.mean())"
        )
    if not loss.requires_grad:
        raise StepOutputError(
            f"train_step's 'loss' does not require grad at step {step}: it is detached from the model "
            "(computed under torch.no_grad(), from .item()/.detach(), or the model has no trainable parameters)"
        )
    return loss


def check_eval_outputs(outputs: Any) -> Mapping[str, Any]:
    if not isinstance(outputs, Mapping):
        raise StepOutputError(
            f"test_step must return a dict such as {{'loss': loss}}, got {type(outputs).__name__}"
        )
    return outputs


def check_monitor(monitor: str, metrics: Mapping[str, float], validates: bool) -> bool:
    """Whether ``monitor`` can be judged yet; raises when it never will be.

    Called at each epoch end until it returns True. The monitored metric is missing for good
    when its phase produced metrics this epoch but not this one (a misspelt name such as
    ``valid/accuracy`` beside ``valid/acc``), or when it names validation and the run has no
    validation loader. A ``valid/`` metric in an epoch that did not validate
    (``valid_every_n_epochs``) is judged at the first epoch that does.
    """
    if monitor in metrics:
        return True
    phase = monitor.split("/", 1)[0] if "/" in monitor else ""
    produced = any(name.startswith(phase + "/") for name in metrics) if phase else True
    if phase == "valid" and not produced and validates:
        return False  # validation is not due this epoch: judge it when it runs
    close = difflib.get_close_matches(monitor, list(metrics), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    why = (
        "run() was given no valid_loader, so no 'valid/' metric will ever exist"
        if phase == "valid" and not validates
        else "this epoch produced no such metric"
    )
    raise TrainerConfigError(
        f"monitor={monitor!r} is not a metric of this run: {why}.{hint} The metrics are "
        f"{sorted(metrics)}. To fix, set monitor= to one of them (names are '<phase>/<key>' with the keys "
        "train_step/test_step return); best checkpoints, early stopping and plateau schedulers all use it."
    )

