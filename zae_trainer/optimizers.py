"""Several optimizers and schedulers on one trainer (GANs, a separate momentum schedule).

``Trainer(model, optimizer={"generator": opt_g, "discriminator": opt_d}, scheduler={...})``:

* ``train_step`` returns one loss per optimizer, ``{"loss": {"generator": g_loss,
  "discriminator": d_loss}, ...}``; a name left out this batch steps nothing this batch (train
  the discriminator every other step, say). They are logged as ``train/loss/<name>``, and
  ``train/loss`` is their sum (the core's NaN/Inf check and the default monitor read it). Each loss's gradients reach **only its own
  optimizer's parameters**: the loop runs the losses' backwards in the order of the optimizer
  dict and, around each one, keeps the other optimizers' gradients as they were, so a
  generator loss that flows through the discriminator leaves the discriminator's gradients
  alone. The losses must not share a graph that two backwards would both traverse (detach
  the generator's output in the discriminator loss, as GAN code does); PyTorch's own error
  says so if they do.
* Then each optimizer with a loss steps in turn. While one steps, ``trainer.optimizer`` **is
  that optimizer** and ``trainer.stepping`` its name, and ``BEFORE_OPTIMIZER_STEP`` /
  ``AFTER_OPTIMIZER_STEP`` fire once for it, so add-ons apply per optimizer: clipping clips
  that optimizer's parameters. ``NonFiniteGuardAddon`` checks all the step's losses and
  gradients at the first optimizer's step, and a step it skips is skipped for every optimizer. ``progress_checker.step``
  counts loop steps (one per batch group, whatever the number of optimizers). Outside the
  step ``trainer.optimizer`` is the first optimizer of the dict.
* A scheduler dict is a :class:`SchedulerGroup`: all of them step together, at the point the
  trainer steps a scheduler (per epoch, or per step with ``scheduler_step_on_batch``); a
  ``ReduceLROnPlateau`` in it gets the monitored value. It works with one optimizer too
  (an LR and a momentum schedule).
* Checkpoints: ``"optimizer"`` holds the first optimizer's state (what tools that read one
  optimizer expect) and ``"optimizers"`` the others' by name; ``"scheduler"`` holds
  ``{name: state}``. Resume restores all of them.

What is refused, because it was never run: several optimizers with fp16 loss scaling
(``PrecisionMixerAddon`` with a ``GradScaler``), and with a multi-process strategy (DDP,
FSDP, Accelerate). A trainer with one optimizer takes none of these paths: nothing here
costs it anything per step.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .errors import StepOutputError

__all__ = ["SchedulerGroup", "check_several_losses", "optimizer_dict", "parameters_of", "scheduler_or_group"]


class SchedulerGroup:
    """Several schedulers stepped as one (``scheduler={"lr": ..., "momentum": ...}``).

    Examples
    --------
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    >>> group = SchedulerGroup({"lr": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)})
    >>> opt.step(); group.step(); opt.param_groups[0]["lr"]
    0.5
    """

    def __init__(self, schedulers: Mapping[str, Any]) -> None:
        if not schedulers:
            raise ValueError("scheduler={} holds no scheduler. To fix, pass scheduler=None or name at least one.")
        for name, scheduler in schedulers.items():
            if not callable(getattr(scheduler, "step", None)) or not callable(getattr(scheduler, "state_dict", None)):
                raise TypeError(
                    f"scheduler[{name!r}] is a {type(scheduler).__name__}, which has no step()/state_dict(). To fix, "
                    "pass torch.optim.lr_scheduler objects (or objects with the same methods)."
                )
        self.schedulers = dict(schedulers)

    def step(self, metrics: float | None = None, **kwargs: Any) -> None:
        """Step every scheduler; a ``ReduceLROnPlateau`` gets ``metrics``, the others ``kwargs``."""
        for scheduler in self.schedulers.values():
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if metrics is None:
                    raise ValueError(
                        "a ReduceLROnPlateau in the scheduler dict needs the monitored metric, and step() got none"
                    )
                scheduler.step(metrics)
            else:
                scheduler.step(**kwargs)

    @property
    def needs_metric(self) -> bool:
        return any(isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) for s in self.schedulers.values())

    def state_dict(self) -> dict[str, Any]:
        return {name: s.state_dict() for name, s in self.schedulers.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = sorted(set(self.schedulers) - set(state))
        if missing:
            raise KeyError(
                f"the checkpoint's scheduler state has no entry for {missing} (it has {sorted(state)}). To fix, name "
                "the schedulers as the run that wrote it did."
            )
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state[name])

    def __repr__(self) -> str:
        return f"SchedulerGroup({', '.join(f'{k}={type(v).__name__}' for k, v in self.schedulers.items())})"


def optimizer_dict(optimizer: Any) -> dict[str, torch.optim.Optimizer] | None:
    """The named optimizers when ``optimizer=`` is a mapping of two or more, else None.

    A mapping with one entry is that optimizer (the single-optimizer loop).
    """
    if not isinstance(optimizer, Mapping):
        return None
    if not optimizer:
        raise ValueError("optimizer={} holds no optimizer. To fix, pass optimizer=None or name at least one.")
    for name, opt in optimizer.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"optimizer names must be non-empty strings, got {name!r}")
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer[{name!r}] must be a torch.optim.Optimizer, got {type(opt).__name__}")
    owners: dict[int, str] = {}
    for name, opt in optimizer.items():
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in owners and owners[id(p)] != name:
                    raise ValueError(
                        f"a parameter is held by both optimizer {owners[id(p)]!r} and {name!r}; each loss steps its "
                        "own optimizer's parameters, so they must not overlap. To fix, give each parameter to one "
                        "optimizer (e.g. generator.parameters() and discriminator.parameters())."
                    )
                owners[id(p)] = name
    return dict(optimizer) if len(optimizer) > 1 else None


def scheduler_or_group(scheduler: Any) -> Any:
    """``scheduler=`` as the trainer keeps it: a mapping becomes a :class:`SchedulerGroup`."""
    if isinstance(scheduler, Mapping):
        return SchedulerGroup(scheduler)
    return scheduler


def parameters_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter ``optimizer`` updates, in its param-group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def check_several_losses(outputs: Any, optimizers: Mapping[str, Any], step: int) -> dict[str, torch.Tensor]:
    """``train_step``'s ``{"loss": {name: scalar with grad}}`` with several optimizers (Python-side checks only)."""
    losses = outputs.get("loss") if isinstance(outputs, Mapping) else None
    example = "{'loss': {" + ", ".join(f"'{n}': {n}_loss" for n in optimizers) + "}}"
    if not isinstance(losses, Mapping) or not losses:
        raise StepOutputError(
            f"train_step returned {type(outputs).__name__ if not isinstance(outputs, Mapping) else 'a loss that is not a dict'} "
            f"at step {step}; with several optimizers it must return one loss per optimizer, e.g. {example}"
        )
    unknown = sorted(set(losses) - set(optimizers))
    if unknown:
        raise StepOutputError(
            f"train_step returned losses for {unknown} at step {step}, which name no optimizer (the optimizers are "
            f"{list(optimizers)}). To fix, key each loss by its optimizer's name, e.g. {example}"
        )
    for name, loss in losses.items():
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise StepOutputError(
                f"loss {name!r} at step {step} must be a one-element tensor with a graph (requires_grad), got "
                f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else f' of shape {tuple(loss.shape)}'}"
            )
    return {name: losses[name] for name in optimizers if name in losses}
