"""MultiGPUAddon: data-parallel training with PyTorch's DistributedDataParallel.

One add-on, three ways to launch; the user's trainer subclass does not change:

1. **The trainer spawns** (zae-engine style): ``device=["cuda:0", "cuda:1"]`` (or
   ``device="cpu", world_size=2`` with the gloo backend, for testing anywhere) and ``run()``
   starts one process per device, each with its own trainer, then loads rank 0's trained
   state back into the caller's trainer (see :mod:`~zae_trainer.addons.distributed.spawn`).
2. **A launcher starts the processes**: under ``torchrun`` or ``accelerate launch`` (which set
   ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) every process builds the trainer; this add-on
   puts the model on ``cuda:LOCAL_RANK`` (CPU stays CPU), creates the process group when
   ``run()`` starts and destroys it when ``run()`` ends. Multi-node works as the launcher
   does. ``srun`` (SLURM) counts as a launcher: its tasks join as ranks (see
   :mod:`zae_trainer.slurm`).
3. **The user created the process group** already: it is used, and left alone.

In each process: the model is wrapped in ``DistributedDataParallel`` once it is on its device;
training loaders get a ``DistributedSampler`` (the loader's settings kept, ``set_epoch`` every
epoch), validation loaders an unpadded one so every sample is evaluated once; epoch metrics
are all-reduced, weighted by sample counts, so every rank sees the same global values (and
early stopping decides alike everywhere); side effects (progress bar, logs, checkpoint
writes) happen on rank 0; checkpoints hold the unwrapped model, loadable in one process and
vice versa. Under gradient accumulation the non-final micro-batches skip DDP's all-reduce
(``model.no_sync()``).

Backend: ``nccl`` for CUDA, ``gloo`` for CPU, or ``backend=``. Collectives time out after
``collective_timeout`` seconds, so a rank that dies cannot hang the others forever.

Ranks stop together: a SIGINT/SIGTERM that reaches some ranks only is agreed at the next
training batch boundary (one small CPU all-reduce per batch on a gloo side group, launched at
one boundary and waited at the next: no device synchronisation), so every rank takes the
interrupt path (``Event.INTERRUPT``, emergency checkpoint, status ``"interrupted"``) after the
same batch. And ranks start together: when a run starts (after any resume) the ranks compare
their ``(epoch, batch in epoch, step)`` and refuse to train from different checkpoints. See
:mod:`~zae_trainer.addons.distributed.stop`.
"""

from __future__ import annotations

import contextlib
import math
from datetime import timedelta
from typing import Any, ContextManager, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..addon import AddOn
from ..errors import TrainerConfigError
from ..slurm import join_slurm_tasks
from .distributed.env import (
    choose_backend,
    current_rank,
    current_world_size,
    free_port,
    group_active,
    launched_externally,
    local_rank,
    worker_context,
)
from .distributed.sampler import distribute_loader, distributed_sampler_of
from .distributed.spawn import DistributedWorkerError, SpawnPlan, launch
from .distributed.stop import StopAgreement, agree_in_phase, check_same_position

__all__ = ["MultiGPUAddon", "DistributedWorkerError"]

_BACKENDS = ("nccl", "gloo", "mpi", "ucc", "xccl")


class _DistributedStrategy:
    """The trainer-side overrides; each chains with ``super()`` and asks the add-on."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # Runs before Trainer.__init__: under a launcher, selects this process's GPU so that
        # device="cuda" / None places the model on cuda:LOCAL_RANK from the start. (The
        # constructor arguments spawned workers are rebuilt from are recorded by the core:
        # Trainer.constructor_call.)
        parent_new = super().__new__
        self = parent_new(cls) if parent_new is object.__new__ else parent_new(cls, *args, **kwargs)
        if not launched_externally() and worker_context() is None:
            join_slurm_tasks()  # srun's tasks become ranks, as if torchrun had started them
        if launched_externally() and torch.cuda.is_available() and worker_context() is None:
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        return self

    def run(self, n_epoch: int, loader: Iterable[Any], valid_loader: Iterable[Any] | None = None, **kwargs: Any) -> None:
        addon: MultiGPUAddon = self.addon_of(MultiGPUAddon)  # type: ignore[attr-defined]
        if addon.must_spawn():
            addon.spawn(n_epoch, loader, valid_loader, kwargs)
            return
        with addon.process_group(), addon.agreement():
            try:
                super().run(n_epoch, loader, valid_loader, **kwargs)  # type: ignore[misc]
            finally:
                self.model = self.unwrap_model(getattr(self, "model"))  # type: ignore[attr-defined]

    def wrap_model(self, model: nn.Module) -> nn.Module:
        model = super().wrap_model(model)  # type: ignore[misc]
        return self.addon_of(MultiGPUAddon).wrap(model)  # type: ignore[attr-defined,no-any-return]

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        return super().unwrap_model(model)  # type: ignore[misc,no-any-return]

    def prepare_loader(self, loader: Any, *, train: bool) -> Any:
        loader = super().prepare_loader(loader, train=train)  # type: ignore[misc]
        return self.addon_of(MultiGPUAddon).shard(loader, train=train)  # type: ignore[attr-defined]

    def no_sync(self) -> ContextManager[Any]:
        outer = super().no_sync()  # type: ignore[misc]
        model: Any = getattr(self, "model")
        if isinstance(model, DistributedDataParallel):
            return _both(outer, model.no_sync())
        return outer  # type: ignore[no-any-return]

    def all_reduce_sums(self, values: list[float]) -> list[float]:
        values = super().all_reduce_sums(values)  # type: ignore[misc]
        return self.addon_of(MultiGPUAddon).reduce_sums(values)  # type: ignore[attr-defined,no-any-return]

    def agree_to_stop(self, pending: int | None, *, phase_end: bool = False) -> int | None:
        pending = super().agree_to_stop(pending, phase_end=phase_end)  # type: ignore[misc]
        addon = self.addon_of(MultiGPUAddon)  # type: ignore[attr-defined]
        return addon.agree(pending, phase_end, self.phase)  # type: ignore[attr-defined,no-any-return]

    @property
    def is_main_process(self) -> bool:
        return super().is_main_process and current_rank() == 0  # type: ignore[misc,no-any-return]

    @property
    def world_size(self) -> int:
        own = current_world_size()
        return own if own > 1 else super().world_size  # type: ignore[misc,no-any-return]


@contextlib.contextmanager
def _both(first: ContextManager[Any], second: ContextManager[Any]) -> Iterator[None]:
    with first, second:
        yield


class MultiGPUAddon(AddOn):
    """Distributed data-parallel training (DDP), spawned by the trainer or by a launcher.

    Parameters
    ----------
    world_size : int or None
        Processes to spawn when no launcher started this one. Default: one per device in
        ``device=[...]``. With ``device="cpu"``, ``world_size=2`` runs two CPU processes
        (gloo) — handy to test distributed code on a laptop.
    backend : str or None
        ``torch.distributed`` backend; default ``"nccl"`` for CUDA devices, ``"gloo"`` for CPU.
    init_method : str or None
        How spawned processes find each other (zae-engine's setting), e.g.
        ``"tcp://10.0.0.1:29500"``. Default: a free port on 127.0.0.1 when spawning,
        ``"env://"`` (the launcher's ``MASTER_ADDR``/``MASTER_PORT``) under a launcher.
    collective_timeout : float
        Seconds a collective (all-reduce, barrier) may wait before failing, so that a rank
        that died ends the others in bounded time. Default 10 minutes.
    find_unused_parameters : bool
        Passed to ``DistributedDataParallel``: needed when some parameters get no gradient
        in a step.
    ddp_kwargs : Mapping or None
        Further ``DistributedDataParallel`` arguments (``broadcast_buffers``,
        ``gradient_as_bucket_view``, ``static_graph``, ``bucket_cap_mb``, ...).
    sampler_seed : int
        Shuffling seed of the injected samplers when the loader has no generator of its own
        (with one, its seed is used, so every rank agrees).
    start_method : {"spawn", "forkserver"}
        How the trainer starts its processes. ``"spawn"`` works everywhere, CUDA included.

    Examples
    --------
    >>> DDPTrainer = MyTrainer.add_on(MultiGPUAddon)                      # doctest: +SKIP
    >>> trainer = DDPTrainer(model, device=["cuda:0", "cuda:1"], optimizer=opt)  # doctest: +SKIP
    >>> trainer.run(10, loader, valid_loader)  # two processes; trainer holds the result  # doctest: +SKIP
    """

    name = "multi_gpu"
    order = -200  # set_epoch before anything iterates; nothing else depends on it
    trainer_mixin = _DistributedStrategy
    conflicts_with = ("accelerate",)

    def __init__(
        self,
        *,
        world_size: int | None = None,
        backend: str | None = None,
        init_method: str | None = None,
        collective_timeout: float = 600.0,
        find_unused_parameters: bool = False,
        ddp_kwargs: Mapping[str, Any] | None = None,
        sampler_seed: int = 0,
        start_method: str = "spawn",
    ) -> None:
        if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1):
            raise ValueError(f"world_size must be None or an integer >= 1, got {world_size!r}")
        if backend is not None and backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {list(_BACKENDS)} or None (automatic), got {backend!r}")
        if isinstance(collective_timeout, bool) or not isinstance(collective_timeout, (int, float)) or not (
            collective_timeout > 0 and math.isfinite(collective_timeout)
        ):
            raise ValueError(f"collective_timeout must be a positive number of seconds, got {collective_timeout!r}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(
                f"start_method must be 'spawn' or 'forkserver', got {start_method!r}; 'fork' is unsafe with CUDA "
                "and threads"
            )
        self.world_size = world_size
        self.backend = backend
        self.init_method = init_method
        self.collective_timeout = float(collective_timeout)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.ddp_kwargs = dict(ddp_kwargs or {})
        self.sampler_seed = int(sampler_seed)
        self.start_method = start_method
        self._call: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._side_group: Any = None  # gloo group of this run's stop agreement and start check
        self._stop_agreement: StopAgreement | None = None
        self._start_checked = True

    # ==================================================================================
    # Construction: per-rank device, recorded arguments
    # ==================================================================================
    def setup(self, trainer: Any) -> None:
        self._call = trainer.constructor_call
        if "device" in self.ddp_kwargs or "device_ids" in self.ddp_kwargs or "module" in self.ddp_kwargs:
            raise TrainerConfigError(
                "ddp_kwargs may not set module/device_ids: MultiGPUAddon wraps the trainer's model on its rank's "
                "device. To fix, drop them from ddp_kwargs."
            )
        context = worker_context()
        if context is not None:  # a spawned worker: the rank's device from the parent's list
            trainer.devices = list(context.devices)
            trainer.primary_device_index = context.rank
            self._place(trainer, context.device)
        elif launched_externally() and trainer.device.type == "cuda":
            self._place(trainer, torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1)))
        elif not group_active() and not launched_externally():
            self._spawn_devices(trainer)  # fail now, not at run(), on an impossible device list

    @staticmethod
    def _place(trainer: Any, device: torch.device) -> None:
        trainer.device = device
        trainer.model = trainer.model.to(device)

    def planned_world_size(self) -> int:
        """Processes ``run()`` would spawn from this (launcher-less) process."""
        return self.world_size if self.world_size is not None else len(self.trainer.devices)

    def must_spawn(self) -> bool:
        """Whether ``run()`` starts worker processes itself (no launcher, no group, >1 process)."""
        return not group_active() and not launched_externally() and self.planned_world_size() > 1

    def _spawn_devices(self, trainer: Any) -> list[torch.device]:
        devices = list(trainer.devices)
        n = self.planned_world_size()
        if len(devices) == n:
            return devices
        if len(devices) == 1 and devices[0].type == "cpu":
            return devices * n
        raise TrainerConfigError(
            f"world_size={n} does not match the {len(devices)} device(s) given ({[str(d) for d in devices]}); "
            "each process needs its own GPU. To fix, pass one device per process (device=['cuda:0', 'cuda:1']) "
            "and leave world_size unset, or use device='cpu' with world_size=N for CPU processes."
        )

    # ==================================================================================
    # run(): spawn, or use / create the process group
    # ==================================================================================
    def spawn(self, n_epoch: int, loader: Any, valid_loader: Any, run_kwargs: Mapping[str, Any]) -> None:
        """Train in one process per device; afterwards the trainer holds rank 0's final state."""
        trainer = self.trainer
        if isinstance(n_epoch, bool) or not isinstance(n_epoch, int) or n_epoch < 1:
            raise TrainerConfigError(f"n_epoch must be an integer >= 1, got {n_epoch!r}")
        if loader is None:
            raise TrainerConfigError("run() needs a loader, e.g. a torch.utils.data.DataLoader")
        if self._call is None:
            raise TrainerConfigError(
                "MultiGPUAddon cannot spawn: the trainer's constructor arguments were not recorded (was the trainer "
                "built without calling its class?). To fix, construct it as TrainerClass(model, ...)."
            )
        devices = self._spawn_devices(trainer)
        plan = SpawnPlan(
            devices=tuple(devices),
            backend=self.backend or choose_backend(devices[0]),
            init_method=self.init_method or f"tcp://127.0.0.1:{free_port()}",
            timeout=timedelta(seconds=self.collective_timeout),
            start_method=self.start_method,
        )
        launch(trainer, self._call, plan, (n_epoch, loader, valid_loader, run_kwargs))

    @contextlib.contextmanager
    def process_group(self) -> Iterator[None]:
        """Create the process group a launcher asked for, for one ``run()``; destroy it after.

        A group that already exists (the user's, or a spawned worker's) is used as it is.
        """
        if group_active() or not launched_externally():
            yield
            return
        trainer = self.trainer
        dist.init_process_group(
            self.backend or choose_backend(trainer.device),
            init_method=self.init_method or "env://",
            timeout=timedelta(seconds=self.collective_timeout),
            device_id=trainer.device if trainer.device.type == "cuda" else None,
        )
        try:
            yield
        finally:
            dist.destroy_process_group()

    @contextlib.contextmanager
    def agreement(self) -> Iterator[None]:
        """For one ``run()`` in a process group of several ranks: a gloo side group (so it
        works under NCCL too) on which the ranks agree to stop together and check they start
        from the same point (see :mod:`~zae_trainer.addons.distributed.stop`)."""
        if not group_active() or dist.get_world_size() == 1:
            yield
            return
        self._side_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.collective_timeout))
        self._stop_agreement = StopAgreement(self._side_group)
        self._start_checked = False
        failed = True
        try:
            yield
            failed = False
        finally:
            if failed:
                self._stop_agreement.abandon()  # the others may never answer a flag in flight
            group, self._side_group, self._stop_agreement = self._side_group, None, None
            dist.destroy_process_group(group)

    # ==================================================================================
    # What the strategy methods ask
    # ==================================================================================
    def agree(self, pending: int | None, phase_end: bool, phase: str) -> int | None:
        """The signal every rank stops for at this boundary (the same on all), or None.

        Training batches agree one batch behind without blocking; other phases defer a
        signal to their end, where the ranks agree once, blocking. ``phase`` is the trainer's
        (passed in: this runs per batch, where ``self.trainer``, a weak reference, is not read).
        """
        return agree_in_phase(self._stop_agreement, phase, pending, phase_end)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` in a process group, when training."""
        trainer = self.trainer
        if not group_active() or trainer.run_kind != "train" or isinstance(model, DistributedDataParallel):
            return model
        if not any(p.requires_grad for p in model.parameters()):
            return model  # nothing to synchronise (and DDP refuses such a module)
        device = trainer.device
        return DistributedDataParallel(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters,
            **self.ddp_kwargs,
        )

    def shard(self, loader: Any, *, train: bool) -> Any:
        """This rank's share of ``loader`` (unchanged in one process)."""
        world = current_world_size()
        if world == 1 or not group_active():
            return loader
        return distribute_loader(loader, rank=current_rank(), world_size=world, train=train, seed=self.sampler_seed)

    def reduce_sums(self, values: list[float]) -> list[float]:
        """Sum ``values`` over all ranks: one float64 all-reduce (plus a length check)."""
        if not group_active() or dist.get_world_size() == 1:
            return values
        device = self.trainer.device if dist.get_backend() == "nccl" else torch.device("cpu")
        n = len(values)
        lengths = torch.tensor([n, -n], dtype=torch.float64, device=device)
        dist.all_reduce(lengths, op=dist.ReduceOp.MAX)
        longest, shortest = int(lengths[0].item()), -int(lengths[1].item())
        if longest != shortest:
            raise RuntimeError(
                f"ranks report different numbers of metric values at the end of epoch "
                f"{self.trainer.progress_checker.epoch + 1} (this rank {n}, others between {shortest} and "
                f"{longest}): every rank's train_step/test_step must return the same keys, and every rank must "
                "see at least one validation batch."
            )
        if n == 0:
            return values
        summed = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        return [float(v) for v in summed.tolist()]

    # ==================================================================================
    # Hooks
    # ==================================================================================
    def on_epoch_begin(self, trainer: Any) -> None:
        if not self._start_checked:  # after RUN_BEGIN, where the state manager resumes
            self._start_checked = True
            pc = trainer.progress_checker
            check_same_position(self._side_group, (pc.epoch, pc.batch_in_epoch, pc.step))
        epoch = trainer.progress_checker.epoch
        for loader in (trainer.loader, trainer.valid_loader):
            sampler = distributed_sampler_of(loader)
            if sampler is not None:
                sampler.set_epoch(epoch)

