"""SupervisedTrainer: the trainer that configs and the command line build, and the one to
reach for when batches are ``(inputs, targets)``.

``loss = loss_fn(model(inputs), targets)``. It reports accuracy, computed on the device,
when the loss says what its output means (see :func:`zae_trainer.losses.task_of`):

* multi-class (cross-entropy, NLL): ``argmax`` of logits ``(N, C)`` against class indices;
* binary (BCE, from logits or probabilities): ``sigmoid(logit) > 0.5`` (or ``p > 0.5``)
  against targets ``> 0.5``; logits ``(N,)`` or ``(N, 1)`` with targets ``(N,)`` or
  ``(N, 1)``: the target is reshaped to the output and cast to its dtype before the loss
  (torch's BCE losses want both). Multi-label outputs ``(N, L)`` report the mean over labels.

It can be built from objects (as :class:`~zae_trainer.Trainer`), or from keyword settings
alone: names for the optimizer, scheduler and loss, and datasets it wraps in loaders. Names
are resolved when the trainer is constructed, so a misspelt one fails there, not at step 1.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Literal, Mapping

import torch
from torch import nn

from .builders import build_loss, build_optimizer, build_scheduler
from .errors import StepOutputError, TrainerConfigError
from .losses import Task, task_of
from .trainer import Trainer

__all__ = ["SupervisedTrainer"]

_ARG = "SupervisedTrainer argument "


class SupervisedTrainer(Trainer):
    """A ready trainer for ``(inputs, targets)`` data.

    Parameters
    ----------
    model, device, mode
        As for :class:`~zae_trainer.Trainer`.
    optimizer : Optimizer, str, Mapping or None
        An optimizer, or a ``torch.optim`` class name (``"AdamW"``) or ``{"name": "AdamW", ...}``,
        built over the model's parameters with ``lr``, ``momentum``, ``weight_decay`` and
        ``optimizer_args``.
    scheduler : LR scheduler, str, Mapping or None
        A scheduler, or a ``torch.optim.lr_scheduler`` class name with ``scheduler_args``
        (``step_on_batch`` there sets ``scheduler_step_on_batch``).
    loss : Criterion, str, Mapping or None
        The loss: a callable ``(output, target) -> scalar``, or a name: ours
        (``"cross_entropy"``, ``"bce"``) or ``torch.nn``'s (``"CrossEntropyLoss"``), with
        ``label_smoothing`` and ``loss_args``. Default: cross-entropy. ``loss_fn`` is the
        same setting under its older name.
    lr, momentum, weight_decay : float or None
        Optimizer settings, when ``optimizer`` is a name (None: the optimizer's default).
    label_smoothing : float or None
        For a loss given by name (cross-entropy or ``"bce"``).
    train_dataset, valid_dataset, test_dataset : Dataset or None
        Wrapped in ``DataLoader`` s with ``batch_size``, ``shuffle`` (training only),
        ``num_workers`` and, when ``seed`` is given, a seeded shuffling generator; ``run()``
        and ``test()`` use them when no loader is passed. ``trainer.loaders`` holds them.
    valid_batch_size : int or None
        Batch size of the validation and test loaders (default: ``batch_size``).
    **kwargs
        Every other :class:`~zae_trainer.Trainer` setting, and add-on settings.

    Examples
    --------
    From objects:

    >>> model = nn.Linear(4, 3)
    >>> trainer = SupervisedTrainer(model, "cpu", "train", torch.optim.SGD(model.parameters(), lr=0.1),
    ...                             None, loss_fn=nn.CrossEntropyLoss(), log_bar=False)

    From keyword settings alone:

    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    >>> trainer = SupervisedTrainer(nn.Linear(4, 3), optimizer="AdamW", lr=1e-3, loss="cross_entropy",
    ...                             label_smoothing=0.1, train_dataset=data, batch_size=8, shuffle=True,
    ...                             num_workers=0, device="cpu", log_bar=False)
    >>> trainer.run(1)
    """

    def __init__(
        self,
        model: nn.Module,
        device: Any = None,
        mode: Literal["train", "test"] = "train",
        optimizer: torch.optim.Optimizer | str | Mapping[str, Any] | None = None,
        scheduler: Any = None,
        *,
        loss: Callable[[Any, Any], torch.Tensor] | str | Mapping[str, Any] | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | str | Mapping[str, Any] | None = None,
        lr: float | None = None,
        momentum: float | None = None,
        weight_decay: float | None = None,
        optimizer_args: Mapping[str, Any] | None = None,
        scheduler_args: Mapping[str, Any] | None = None,
        label_smoothing: float | None = None,
        loss_args: Mapping[str, Any] | None = None,
        train_dataset: Any = None,
        valid_dataset: Any = None,
        test_dataset: Any = None,
        batch_size: int = 32,
        valid_batch_size: int | None = None,
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if loss is not None and loss_fn is not None:
            raise TrainerConfigError("give loss= or loss_fn= (the same setting), not both")
        criterion = _loss_entry(loss if loss is not None else loss_fn, label_smoothing, loss_args)
        if isinstance(criterion, (str, Mapping)):
            criterion = build_loss(criterion, "loss", _ARG)
        if isinstance(model, nn.Module) and isinstance(optimizer, (str, Mapping)):
            entry = _with_settings(
                optimizer, "optimizer", {"lr": lr, "momentum": momentum, "weight_decay": weight_decay},
                optimizer_args,
            )
            optimizer = build_optimizer(entry, model.parameters(), "optimizer", _ARG)
        else:
            _refuse_unused("optimizer", optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           optimizer_args=optimizer_args)
        if isinstance(scheduler, (str, Mapping)):
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TrainerConfigError(f"{_ARG}scheduler: {scheduler!r} needs an optimizer; give optimizer= too")
            entry = _with_settings(scheduler, "scheduler", {}, scheduler_args)
            scheduler, step_on_batch = build_scheduler(entry, optimizer, "scheduler", _ARG)
            if step_on_batch is not None:
                kwargs.setdefault("scheduler_step_on_batch", step_on_batch)
        else:
            _refuse_unused("scheduler", scheduler, scheduler_args=scheduler_args)
        super().__init__(model, device, mode, optimizer, scheduler, **kwargs)
        self.loss_fn = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.loaders: dict[str, Any] = _loaders(
            train_dataset, valid_dataset, test_dataset, batch_size, valid_batch_size, shuffle, num_workers, seed
        )

    # -- the loss and what its output means -------------------------------------------------
    @property
    def loss_fn(self) -> Callable[[Any, Any], torch.Tensor]:
        """The criterion; assigning one also sets ``task`` (what its output means, for accuracy)."""
        return self._loss_fn

    @loss_fn.setter
    def loss_fn(self, criterion: Callable[[Any, Any], torch.Tensor]) -> None:
        if not callable(criterion):
            raise TypeError(f"loss_fn must be callable as loss_fn(output, target), got {type(criterion).__name__}")
        self._loss_fn = criterion
        self.task: Task | None = task_of(criterion)

    # -- running on the datasets given at construction -------------------------------------------
    def run(  # type: ignore[override]
        self,
        n_epoch: int,
        loader: Iterable[Any] | None = None,
        valid_loader: Iterable[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """As :meth:`Trainer.run`; ``loader`` / ``valid_loader`` default to the loaders built from
        ``train_dataset`` / ``valid_dataset``."""
        if loader is None:
            loader = self.loaders.get("train")
            if loader is None:
                raise TrainerConfigError(
                    "run() needs a loader: pass one, or give train_dataset= when constructing the trainer"
                )
        if valid_loader is None:
            valid_loader = self.loaders.get("valid")
        super().run(n_epoch, loader, valid_loader, **kwargs)

    def test(  # type: ignore[override]
        self, loader: Iterable[Any] | None = None, weights: str | os.PathLike[str] | None = None
    ) -> dict[str, float]:
        """As :meth:`Trainer.test`; ``loader`` defaults to the one built from ``test_dataset``."""
        if loader is None:
            loader = self.loaders.get("test")
            if loader is None:
                raise TrainerConfigError(
                    "test() needs a loader: pass one, or give test_dataset= when constructing the trainer"
                )
        return super().test(loader, weights)

    # -- steps ---------------------------------------------------------------------------------------
    def _split(self, batch: Any) -> tuple[Any, Any]:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise StepOutputError(
            f"SupervisedTrainer expects (inputs, targets) batches, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + "; subclass Trainer and write train_step for other layouts"
        )

    def _step(self, batch: Any, keep_output: bool = False) -> dict[str, Any]:
        inputs, targets = self._split(batch)
        outputs = self.model(inputs)
        task = self.task
        binary = task is not None and task.startswith("binary")
        if binary and isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor):
            targets = _binary_targets(outputs, targets)
        result: dict[str, Any] = {"loss": self._loss_fn(outputs, targets)}
        if keep_output:
            result["output"] = outputs
        if isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor):
            if binary:
                threshold = 0.0 if task == "binary-logits" else 0.5  # sigmoid(x) > 0.5  <=>  x > 0
                result["acc"] = ((outputs > threshold) == (targets > 0.5)).float().mean()
            elif (
                task in ("multiclass", None)
                and outputs.dim() == 2
                and targets.dim() == 1
                and not targets.is_floating_point()
            ):
                result["acc"] = (outputs.argmax(1) == targets).float().mean()
        return result

    def train_step(self, batch: Any) -> dict[str, Any]:
        return self._step(batch)

    def test_step(self, batch: Any) -> dict[str, Any]:
        return self._step(batch, keep_output=True)


def _binary_targets(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targets shaped and typed like the outputs: ``(N,)`` <-> ``(N, 1)``, integers -> floats."""
    if targets.shape != outputs.shape and targets.numel() == outputs.numel():
        targets = targets.reshape(outputs.shape)
    if targets.dtype != outputs.dtype:
        targets = targets.to(outputs.dtype)
    return targets


def _loss_entry(entry: Any, label_smoothing: float | None, loss_args: Mapping[str, Any] | None) -> Any:
    extra = dict(loss_args or {})
    if label_smoothing is not None:
        extra["label_smoothing"] = label_smoothing
    if not extra:
        return entry
    if entry is None:
        entry = "cross_entropy"
    if isinstance(entry, (str, Mapping)):
        return _with_settings(entry, "loss", {}, extra)
    raise TrainerConfigError(
        f"{_ARG}label_smoothing / loss_args: they configure a loss given by name, but loss is already a "
        f"{type(entry).__name__} object. To fix, pass loss='cross_entropy' (or 'bce') with them, or set them "
        "on your loss object."
    )


def _with_settings(
    entry: str | Mapping[str, Any], what: str, named: Mapping[str, Any], extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``{"name": ..., **settings}`` from a name or mapping plus keyword settings (None = not given)."""
    spec = {"name": entry} if isinstance(entry, str) else dict(entry)
    for key, value in [*named.items(), *(extra or {}).items()]:
        if value is None:
            continue
        if key in spec and spec[key] != value:
            raise TrainerConfigError(f"{_ARG}{what}: {key!r} is given twice ({spec[key]!r} and {value!r})")
        spec[key] = value
    return spec


def _refuse_unused(what: str, given: Any, **settings: Any) -> None:
    unused = sorted(k for k, v in settings.items() if v is not None)
    if unused:
        kind = "None" if given is None else f"a built {type(given).__name__}"
        raise TrainerConfigError(
            f"{_ARG}{unused[0]}: it configures an {what} given by name, but {what} is {kind}. To fix, pass "
            f"{what}='<class name>' with it (e.g. optimizer='AdamW', lr=1e-3), or set it on your {what} object."
        )


def _loaders(
    train: Any, valid: Any, test: Any, batch_size: int, valid_batch_size: int | None, shuffle: bool,
    num_workers: int, seed: int | None,
) -> dict[str, Any]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TrainerConfigError(f"{_ARG}batch_size must be an integer >= 1, got {batch_size!r}")
    from torch.utils.data import DataLoader

    loaders: dict[str, Any] = {}
    for split, dataset in (("train", train), ("valid", valid), ("test", test)):
        if dataset is None:
            continue
        if not hasattr(dataset, "__getitem__") and not hasattr(dataset, "__iter__"):
            raise TrainerConfigError(
                f"{_ARG}{split}_dataset must be a torch Dataset (or anything a DataLoader takes), got "
                f"{type(dataset).__name__}"
            )
        training = split == "train"
        generator = torch.Generator().manual_seed(seed) if seed is not None and training and shuffle else None
        loaders[split] = DataLoader(
            dataset,
            batch_size=batch_size if training else (valid_batch_size or batch_size),
            shuffle=shuffle and training,
            num_workers=num_workers,
            generator=generator,
        )
    return loaders
