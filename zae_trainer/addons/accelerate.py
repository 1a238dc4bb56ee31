"""AccelerateAddon: hand the model, optimizer and loaders to Hugging Face Accelerate.

What is supported, and tested: one process, and data parallelism (DDP) over the processes
``accelerate launch`` (or ``torchrun``) starts — CPU/gloo in the tests, multi-GPU and
multi-node as Accelerate does it — with Accelerate's mixed precision (``fp16``/``bf16``;
``fp8`` is passed through untested). All of it runs under this trainer's loop, events and
add-ons; the user's trainer subclass does not change.

What is refused, at construction: Accelerate's **FSDP**, **DeepSpeed** and **Megatron-LM**
(``distributed_type`` FSDP / DEEPSPEED / MEGATRON_LM, whether chosen by ``accelerate
config``, ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_MEGATRON_LM``
or a plugin in ``accelerator_kwargs``). Wiring them correctly needs Accelerate's own gradient
accumulation, ``accelerator.clip_grad_norm_`` (a global norm), loaders through ``prepare``
and all-rank ``get_state_dict`` checkpoints; none of that has been run here, so it is not
claimed. For sharded training use :class:`~zae_trainer.addons.distributed.fsdp.FSDPAddon`
(PyTorch's FSDP2 ``fully_shard`` with Distributed Checkpoint saves, tested).

What goes through the ``Accelerator``:

* construction — the ``Accelerator`` is created (it joins the launcher's process group) and
  the model moves to ``accelerator.device``;
* ``prepare_loader`` — per-process shards through a ``DistributedSampler`` (rank and world
  size from the ``Accelerator``), as ``MultiGPUAddon`` does, so that checkpoints resume
  mid-epoch exactly; Accelerate's ``prepare_data_loader`` on TPUs;
* ``wrap_model`` — ``accelerator.prepare(model, optimizer)``; ``trainer.optimizer`` becomes the
  prepared optimizer. The scheduler is **not** prepared: the core steps it (per epoch, or per
  optimizer step), unchanged by the number of processes;
* ``autocast`` — ``accelerator.autocast()`` (``mixed_precision=`` or the launch config);
* ``backward`` — ``accelerator.backward`` whenever Accelerate must own it (loss scaling,
  DeepSpeed, Megatron-LM); otherwise the plain ``loss.backward()`` of the chain;
* ``no_sync`` — ``accelerator.no_sync(model)`` for the non-final micro-batches of gradient
  accumulation (the core's ``accumulate_grad_batches``; Accelerate's own is left at 1);
* before each optimizer step, scaled gradients are unscaled, so clipping sees true values;
* ``is_main_process``, ``world_size``, ``all_reduce_sums`` — from the ``Accelerator``;
* ``unwrap_model`` — ``accelerator.unwrap_model``: checkpoints hold the plain model;
* ``agree_to_stop`` — with several processes, a signal is agreed across ranks at the next
  batch boundary, as under ``MultiGPUAddon`` (:mod:`~zae_trainer.addons.distributed.stop`).

Mixed precision is Accelerate's job here, so this add-on conflicts with ``precision_mixer``;
it also conflicts with ``multi_gpu`` (Accelerate does the distribution). The process group
Accelerate creates stays for the life of the process, as Accelerate intends.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator, Mapping

import torch
from torch import nn

from ..addon import AddOn
from .distributed.sampler import distribute_loader, distributed_sampler_of
from .distributed.stop import StopAgreement, agree_in_phase

__all__ = ["AccelerateAddon"]


class _AccelerateStrategy:
    """Trainer-side overrides; each chains with ``super()`` and asks the add-on's Accelerator."""

    def prepare_loader(self, loader: Any, *, train: bool) -> Any:
        loader = super().prepare_loader(loader, train=train)  # type: ignore[misc]
        return self.addon_of(AccelerateAddon).prepare_loader(loader, train=train)  # type: ignore[attr-defined]

    def wrap_model(self, model: nn.Module) -> nn.Module:
        model = super().wrap_model(model)  # type: ignore[misc]
        return self.addon_of(AccelerateAddon).prepare_model(model)  # type: ignore[attr-defined,no-any-return]

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return super().unwrap_model(_accelerator(self).unwrap_model(model))  # type: ignore[misc,no-any-return]

    def autocast(self) -> ContextManager[Any]:
        return _both(super().autocast(), _accelerator(self).autocast())  # type: ignore[misc]

    def backward(self, loss: torch.Tensor) -> None:
        accelerator = _accelerator(self)
        if _owns_backward(accelerator):
            accelerator.backward(loss)
        else:  # accelerator.backward would call loss.backward() too; the chain lets strategies stack
            super().backward(loss)  # type: ignore[misc]

    def no_sync(self) -> ContextManager[Any]:
        return _both(super().no_sync(), _accelerator(self).no_sync(self.model))  # type: ignore[misc,attr-defined]

    def all_reduce_sums(self, values: list[float]) -> list[float]:
        values = super().all_reduce_sums(values)  # type: ignore[misc]
        return self.addon_of(AccelerateAddon).reduce_sums(values)  # type: ignore[attr-defined,no-any-return]

    def agree_to_stop(self, pending: int | None, *, phase_end: bool = False) -> int | None:
        pending = super().agree_to_stop(pending, phase_end=phase_end)  # type: ignore[misc]
        addon = self.addon_of(AccelerateAddon)  # type: ignore[attr-defined]
        return agree_in_phase(addon.stop_agreement, self.phase, pending, phase_end)  # type: ignore[attr-defined]

    @property
    def is_main_process(self) -> bool:
        return super().is_main_process and bool(_accelerator(self).is_main_process)  # type: ignore[misc]

    @property
    def world_size(self) -> int:
        own = int(_accelerator(self).num_processes)
        return own if own > 1 else super().world_size  # type: ignore[misc,no-any-return]


def _accelerator(trainer: Any) -> Any:
    return trainer.addon_of(AccelerateAddon).accelerator


@contextlib.contextmanager
def _both(first: ContextManager[Any], second: ContextManager[Any]) -> Iterator[None]:
    with first, second:
        yield


def _owns_backward(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType  # type: ignore[import-untyped]

    return accelerator.scaler is not None or accelerator.distributed_type in (
        DistributedType.DEEPSPEED,
        DistributedType.MEGATRON_LM,
    )


def _plain_data_parallel(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType  # type: ignore[import-untyped]

    return accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


_UNTESTED_MODES = {
    "FSDP": ("fsdp_plugin", "ACCELERATE_USE_FSDP"),
    "DEEPSPEED": ("deepspeed_plugin", "ACCELERATE_USE_DEEPSPEED"),
    "MEGATRON_LM": ("megatron_lm_plugin", "ACCELERATE_USE_MEGATRON_LM"),
}


def _requested_modes(kwargs: Mapping[str, Any]) -> list[str]:
    """Accelerate modes asked for by a plugin argument or by ``accelerate launch``'s variables."""
    import os

    truthy = ("1", "true", "yes", "on")
    return [
        mode
        for mode, (plugin, variable) in _UNTESTED_MODES.items()
        if kwargs.get(plugin) is not None or os.environ.get(variable, "").strip().lower() in truthy
    ]


def _refuse_untested_modes(modes: list[str]) -> None:
    refused = [m for m in modes if m in _UNTESTED_MODES]
    if not refused:
        return
    from ..errors import TrainerConfigError

    raise TrainerConfigError(
        f"AccelerateAddon does not support Accelerate's {' / '.join(refused)} mode: it has not been wired and "
        "tested with this trainer (gradient accumulation, global-norm clipping, loaders and all-rank "
        "checkpoints need Accelerate's own calls there), so it is refused rather than run wrongly. To fix, "
        "either train sharded with FSDPAddon (zae_trainer.addons.distributed.fsdp: PyTorch FSDP2, launched by "
        "the trainer or torchrun), or use AccelerateAddon for one process or DDP: drop the plugin from "
        "accelerator_kwargs and unset ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED / "
        "ACCELERATE_USE_MEGATRON_LM (answer 'no' to FSDP/DeepSpeed/Megatron in `accelerate config`)."
    )


class AccelerateAddon(AddOn):
    """Train through Hugging Face Accelerate: one process or DDP via ``accelerate launch``.

    Accelerate's FSDP, DeepSpeed and Megatron-LM modes are refused with
    :class:`~zae_trainer.errors.TrainerConfigError` (see the module docstring); use
    ``FSDPAddon`` for sharded training.

    Parameters
    ----------
    mixed_precision : {"no", "fp16", "bf16", "fp8"} or None
        Accelerate's mixed precision; None takes it from ``accelerate launch`` / ``accelerate config``.
    accelerator_kwargs : Mapping or None
        Further ``accelerate.Accelerator`` arguments (``fsdp_plugin``, ``deepspeed_plugin``,
        ``dataloader_config``, ``kwargs_handlers``, ...). ``cpu`` defaults to whether the
        trainer's device is the CPU.

    Examples
    --------
    >>> Trainer = MyTrainer.add_on(AccelerateAddon(mixed_precision="bf16"))   # doctest: +SKIP
    >>> Trainer(model, optimizer=opt).run(3, loader)   # then: accelerate launch train.py  # doctest: +SKIP
    """

    name = "accelerate"
    order = -200
    trainer_mixin = _AccelerateStrategy
    conflicts_with = ("multi_gpu", "precision_mixer")
    runs_before = ("gradient_clipping",)  # unscale before clipping

    def __init__(self, *, mixed_precision: str | None = None, accelerator_kwargs: Mapping[str, Any] | None = None) -> None:
        if mixed_precision is not None and mixed_precision not in ("no", "fp16", "bf16", "fp8"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16', 'bf16', 'fp8' or None, got {mixed_precision!r}")
        self.mixed_precision = mixed_precision
        self.accelerator_kwargs = dict(accelerator_kwargs or {})
        self.accelerator: Any = None
        self._prepared: nn.Module | None = None
        self._side_group: Any = None  # gloo group of the stop agreement, for the process's life
        self.stop_agreement: StopAgreement | None = None

    def setup(self, trainer: Any) -> None:
        try:
            from accelerate import Accelerator  # type: ignore[import-untyped]
        except ImportError as exc:  # pragma: no cover - accelerate is an optional dependency
            raise ImportError(
                "AccelerateAddon needs Hugging Face Accelerate. To fix, pip install 'zae_trainer[accelerate]'."
            ) from exc
        kwargs = dict(self.accelerator_kwargs)
        _refuse_untested_modes(_requested_modes(kwargs))  # before Accelerate starts anything
        kwargs.setdefault("cpu", trainer.device.type == "cpu")
        if self.mixed_precision is not None:
            kwargs["mixed_precision"] = self.mixed_precision
        self.accelerator = Accelerator(**kwargs)
        _refuse_untested_modes([str(self.accelerator.distributed_type.value)])  # e.g. from accelerate config
        trainer.device = self.accelerator.device
        trainer.devices = [trainer.device]
        trainer.model = trainer.model.to(trainer.device)

    def prepare_loader(self, loader: Any, *, train: bool) -> Any:
        """This process's shard of a ``DataLoader``, as ``MultiGPUAddon`` makes it.

        A plain ``DataLoader`` with a ``DistributedSampler`` (rather than Accelerate's
        ``DataLoaderShard``) keeps the state manager's exact mid-epoch resume. Validation is
        sharded without padding under plain data parallelism, so every sample is evaluated
        once; with FSDP or DeepSpeed, whose forward passes communicate, every process needs
        as many batches, so validation is padded like training. On TPUs (XLA), Accelerate's
        own ``prepare_data_loader`` is used.
        """
        if not isinstance(loader, torch.utils.data.DataLoader):
            return loader
        accelerator = self.accelerator
        from accelerate.utils import DistributedType  # type: ignore[import-untyped]

        if accelerator.distributed_type == DistributedType.XLA:
            return accelerator.prepare_data_loader(loader)
        if accelerator.num_processes == 1:
            return loader
        even = train or not _plain_data_parallel(accelerator)
        return distribute_loader(loader, rank=accelerator.process_index, world_size=accelerator.num_processes, train=even)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """``accelerator.prepare(model, optimizer)`` once; later runs reuse the prepared pair."""
        if model is self._prepared:
            return model
        trainer = self.trainer
        if trainer.run_kind != "train" or trainer.optimizer is None:
            prepared = self.accelerator.prepare_model(model, evaluation_mode=True)
        else:
            prepared, trainer.optimizer = self.accelerator.prepare(model, trainer.optimizer)
        self._prepared = prepared
        return prepared  # type: ignore[no-any-return]

    def reduce_sums(self, values: list[float]) -> list[float]:
        """Sum over processes with ``accelerator.reduce``, after checking all send as many."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return values
        device = accelerator.device
        lengths = accelerator.gather(torch.tensor([len(values)], device=device))
        if int(lengths.min()) != int(lengths.max()):
            raise RuntimeError(
                f"processes report different numbers of metric values ({lengths.tolist()}): every process's "
                "train_step/test_step must return the same keys"
            )
        if not values:
            return values
        summed = accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=device), reduction="sum")
        return [float(v) for v in summed.tolist()]

    def on_run_begin(self, trainer: Any) -> None:
        # Ranks stop for a signal at the same batch boundary, as under MultiGPUAddon.
        if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
            if self._side_group is None:
                self._side_group = torch.distributed.new_group(backend="gloo")
            self.stop_agreement = StopAgreement(self._side_group)

    def on_run_end(self, trainer: Any) -> None:
        if self.stop_agreement is not None and trainer.summary.status in ("failed", "interrupted"):
            self.stop_agreement.abandon()
        self.stop_agreement = None

    def on_epoch_begin(self, trainer: Any) -> None:
        for loader in (trainer.loader, trainer.valid_loader):
            sampler = distributed_sampler_of(loader)
            if sampler is not None:
                sampler.set_epoch(trainer.progress_checker.epoch)

    def on_before_optimizer_step(self, trainer: Any) -> None:
        if self.accelerator.scaler is not None:
            self.accelerator.unscale_gradients()
