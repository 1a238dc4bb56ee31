"""FSDPAddon: fully sharded data parallel training with PyTorch's FSDP2 (``fully_shard``).

Use it instead of :class:`~zae_trainer.addons.multi_gpu.MultiGPUAddon` when a full replica of
the parameters, gradients and optimizer state does not fit one device: each rank then keeps
1/N of them and gathers a layer's parameters only while that layer runs. Everything else is
MultiGPUAddon's, reused as it is: the three launch modes (the trainer spawns, ``torchrun`` /
``accelerate launch`` started the processes, or the user's process group), the
``DistributedSampler`` injection, the epoch-metric all-reduce, rank-0-only side effects and
the fault handling (a failing rank is named, collectives time out after
``collective_timeout`` seconds, no worker outlives ``run()``).

What this add-on does on top, in each process, when ``run()`` starts:

1. ``fully_shard`` every module chosen by ``shard_policy`` (innermost first), then the root,
   over a one-dimensional device mesh of all ranks. The model object is sharded **in place**:
   its parameters become ``DTensor`` shards and stay so after ``run()`` (FSDP2 has no
   "unshard for good"); ``trainer.state_dict()`` then holds shards.
2. Point the optimizer at the sharded parameters. FSDP2 replaces the parameter objects, so an
   optimizer built on the original ones would update tensors nobody uses; its state (e.g.
   loaded from a checkpoint before ``run()``) is carried over, each rank keeping its shard.

During training:

* Non-final micro-batches of gradient accumulation neither reduce-scatter gradients
  (``set_requires_gradient_sync(False)``) nor reshard parameters after backward
  (``set_reshard_after_backward(False)``), so one accumulation group all-gathers each layer
  once; ``reshard_between_micro_batches=True`` trades that speed for memory.
* Clipping needs nothing special: ``torch.nn.utils.clip_grad_norm_`` on ``DTensor`` gradients
  computes the norm over all shards (the global norm), which the core's ``gradient_clip`` and
  :class:`~zae_trainer.addons.clipping.GradientClippingAddon` call.

Checkpoints: use ``StateManagerAddon(save_format="dcp")`` (every rank writes its shards
through ``torch.distributed.checkpoint``; loadable with any number of ranks, one included).
The single-file formats would need the whole model on rank 0 and are refused with an error.
A SIGINT/SIGTERM writes an emergency dcp checkpoint (the ranks agree to stop at the same
batch); an exception on one rank does not (the others cannot be reached), with a warning.
``trainer.save_model`` / ``export_weights`` gather the full weights (call them on every rank).
After a spawned run, the caller's (unsharded) trainer receives the full, gathered state.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch
from torch import nn

from ...errors import TrainerConfigError
from ..checkpoint.dcp_format import full_model_state_dict, is_sharded
from ..multi_gpu import MultiGPUAddon, _DistributedStrategy
from .env import current_rank, current_world_size, group_active, launched_externally

__all__ = ["FSDPAddon", "default_shard_policy", "is_sharded", "full_model_state_dict", "native_optimizer_state"]

ShardPolicy = Callable[[nn.Module], bool]
_BLOCK_SUFFIXES = ("Block", "Layer")


def _fsdp() -> Any:
    """torch.distributed.fsdp, imported when first needed (it pulls in DTensor)."""
    import torch.distributed.fsdp as fsdp

    return fsdp


def default_shard_policy(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one when no ``shard_policy`` is given.

    Transformer blocks: ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``, and
    every direct child of an ``nn.ModuleList`` whose class name ends with ``Block`` or
    ``Layer`` (the convention of most transformer code: ``self.layers = ModuleList([Block()
    ...])``). Sharding per block lets FSDP gather one block's parameters at a time; a model
    with no such blocks is sharded as one unit (the root), which still shards the optimizer
    state and gradients but gathers all parameters for the forward pass.
    """
    chosen: list[nn.Module] = []
    seen: set[int] = set()
    for module in model.modules():
        candidates: list[nn.Module] = []
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            candidates.append(module)
        if isinstance(module, nn.ModuleList):
            candidates.extend(c for c in module if type(c).__name__.endswith(_BLOCK_SUFFIXES))
        for candidate in candidates:
            if id(candidate) not in seen and candidate is not model:
                seen.add(id(candidate))
                chosen.append(candidate)
    return chosen


def _resolve_policy(policy: Sequence[type] | ShardPolicy | None) -> Callable[[nn.Module], list[nn.Module]]:
    if policy is None:
        return default_shard_policy
    if isinstance(policy, type):
        policy = (policy,)
    if isinstance(policy, (list, tuple)):
        classes = tuple(policy)
        bad = [c for c in classes if not (isinstance(c, type) and issubclass(c, nn.Module))]
        if bad:
            raise TypeError(
                f"shard_policy must hold nn.Module subclasses, got {bad!r}. To fix, pass the block classes, e.g. "
                "shard_policy=[MyBlock], or a function module -> bool."
            )
        return lambda model: [m for m in model.modules() if isinstance(m, classes) and m is not model]
    if callable(policy):
        predicate = policy
        return lambda model: [m for m in model.modules() if m is not model and predicate(m)]
    raise TypeError(
        f"shard_policy must be None, a sequence of nn.Module classes or a function module -> bool, got "
        f"{type(policy).__name__}"
    )


class _ShardedStrategy(_DistributedStrategy):
    """MultiGPUAddon's strategy, with FSDP2's accumulation switches instead of DDP's ``no_sync``."""

    def no_sync(self) -> ContextManager[Any]:
        outer = super().no_sync()
        return self.addon_of(FSDPAddon).accumulating(outer)  # type: ignore[attr-defined,no-any-return]


class FSDPAddon(MultiGPUAddon):
    """Fully sharded data parallel training (FSDP2), spawned by the trainer or by a launcher.

    Parameters
    ----------
    shard_policy : sequence of nn.Module classes, callable or None
        Which submodules become their own FSDP unit (sharded, gathered and freed together),
        before the root. Classes: every instance of them; a function ``module -> bool``
        (defined at module level, so that spawned workers can import it): every module it
        accepts. ``None``: transformer blocks (see :func:`default_shard_policy`).
    reshard_after_forward : bool
        Free gathered parameters after a unit's forward and gather again for backward
        (ZeRO-3, least memory; default) or keep them until backward (ZeRO-2 like, faster).
    mixed_precision : torch.distributed.fsdp.MixedPrecisionPolicy or None
        FSDP's own mixed precision: parameters gathered in ``param_dtype``, gradients
        reduced in ``reduce_dtype``, the sharded fp32 master copy kept for the optimizer
        (and in checkpoints). Tested on the CPU with gloo (bf16 parameters, fp32 reduction);
        not run on CUDA here.
    cpu_offload : bool
        Keep sharded parameters, gradients and optimizer state in CPU memory between uses
        (``CPUOffloadPolicy``, pinned memory on CUDA), the optimizer stepping on the CPU.
        On a CPU device it saves nothing (the shards are in CPU memory already) but runs the
        same code path, so a cluster configuration can be tried on a laptop; tested there,
        not run on CUDA here.
    reshard_between_micro_batches : bool
        Under gradient accumulation, reshard parameters after every micro-batch (least
        memory) instead of keeping them gathered until the group's last micro-batch.
    world_size, backend, init_method, collective_timeout, sampler_seed, start_method : see MultiGPUAddon
        As for :class:`~zae_trainer.addons.multi_gpu.MultiGPUAddon`: processes to spawn,
        ``torch.distributed`` backend, rendezvous address, seconds before a collective fails,
        shuffling seed of the injected samplers, and how spawned processes start.

    Examples
    --------
    >>> Sharded = MyTrainer.add_on(FSDPAddon(shard_policy=[MyBlock]),
    ...                            StateManagerAddon(save_path="ckpt", save_format="dcp"))  # doctest: +SKIP
    >>> Sharded(model, device="cpu", world_size=2, optimizer=opt).run(3, loader)  # doctest: +SKIP
    """

    name = "fsdp"
    order = -200
    trainer_mixin = _ShardedStrategy
    conflicts_with = ("accelerate", "multi_gpu")

    def __init__(
        self,
        *,
        shard_policy: Sequence[type] | ShardPolicy | None = None,
        reshard_after_forward: bool = True,
        mixed_precision: Any = None,
        cpu_offload: bool = False,
        reshard_between_micro_batches: bool = False,
        world_size: int | None = None,
        backend: str | None = None,
        init_method: str | None = None,
        collective_timeout: float = 600.0,
        sampler_seed: int = 0,
        start_method: str = "spawn",
    ) -> None:
        super().__init__(
            world_size=world_size,
            backend=backend,
            init_method=init_method,
            collective_timeout=collective_timeout,
            sampler_seed=sampler_seed,
            start_method=start_method,
        )
        self._targets = _resolve_policy(shard_policy)
        if mixed_precision is not None and not isinstance(mixed_precision, _fsdp().MixedPrecisionPolicy):
            raise TypeError(
                f"mixed_precision must be a torch.distributed.fsdp.MixedPrecisionPolicy or None, got "
                f"{type(mixed_precision).__name__}. To fix, e.g. MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
                "reduce_dtype=torch.float32)."
            )
        self.reshard_after_forward = bool(reshard_after_forward)
        self.mixed_precision = mixed_precision
        self.cpu_offload = bool(cpu_offload)
        self.reshard_between_micro_batches = bool(reshard_between_micro_batches)

    # ==================================================================================
    # Construction
    # ==================================================================================
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if not self.shards(trainer):
            return  # one process: nothing is sharded, every checkpoint format works
        if trainer.device.type == "cpu" and not hasattr(torch.cpu.Stream, "record_event"):
            raise TrainerConfigError(  # FSDP2 records events on the CPU stream, which torch < 2.7 lacks
                f"FSDPAddon on the CPU needs torch 2.7 or newer (torch {torch.__version__} has no "
                "torch.cpu.Stream.record_event, which FSDP2 calls). To fix, upgrade torch, train on CUDA "
                "devices, or use MultiGPUAddon (DDP) on the CPU."
            )
        for addon in trainer.addon_instances:
            fmt = getattr(addon, "save_format", None)
            if addon.name == "state_manager" and fmt not in (None, "dcp"):
                raise TrainerConfigError(
                    f"StateManagerAddon(save_format={fmt!r}) writes the whole model from rank 0, which a sharded "
                    "model does not have (and a model that needs FSDP may not fit one process). To fix, use "
                    "save_format='dcp': every rank writes its shards, and the checkpoint loads with any number "
                    "of processes; trainer.export_weights(path) still writes one .safetensors file for serving."
                )
            if addon.name == "state_manager" and getattr(addon, "save_every_n_steps", None) is not None:
                raise TrainerConfigError(
                    "StateManagerAddon(save_every_n_steps=...) saves at rank 0's log points, but a sharded "
                    "checkpoint needs every rank to write at the same step. To fix, use save_every_n_epochs or "
                    "save_last with FSDPAddon."
                )

    def shards(self, trainer: Any) -> bool:
        """Whether ``run()`` will shard: several processes, spawned or launched, or a group."""
        return group_active() or launched_externally() or self.planned_world_size() > 1

    # ==================================================================================
    # What the strategy methods ask
    # ==================================================================================
    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` in place across the process group (a no-op in one process)."""
        if not group_active() or is_sharded(model):
            return model
        fsdp = _fsdp()
        from torch.distributed.device_mesh import init_device_mesh

        trainer = self.trainer
        device = trainer.device
        mesh = init_device_mesh(device.type, (current_world_size(),))
        options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward}
        if self.mixed_precision is not None:
            options["mp_policy"] = self.mixed_precision
        if self.cpu_offload:
            options["offload_policy"] = fsdp.CPUOffloadPolicy(pin_memory=device.type == "cuda")
        optimizer = trainer.optimizer
        before = _optimizer_snapshot(model, optimizer)
        targets = self._targets(model)
        for module in reversed(targets):  # innermost first: a unit never contains a sharded one's params twice
            fsdp.fully_shard(module, **options)
        fsdp.fully_shard(model, **options)
        if optimizer is not None:
            _rebind_optimizer(model, optimizer, before)
        return model

    @contextlib.contextmanager
    def accumulating(self, outer: ContextManager[Any]) -> Iterator[None]:
        """Around a micro-batch that does not end its accumulation group."""
        model = self.trainer.model
        if not is_sharded(model):
            with outer:
                yield
            return
        model.set_requires_gradient_sync(False)
        if not self.reshard_between_micro_batches:
            model.set_reshard_after_backward(False)
        try:
            with outer:
                yield
        finally:
            model.set_requires_gradient_sync(True)
            model.set_reshard_after_backward(True)

    def gather_trainer_state(self) -> dict[str, Any]:
        """``trainer.state_dict()`` with the full model and optimizer state, on rank 0.

        A collective: every rank must call it (the spawn launcher does, to bring the trained
        state back to the caller's trainer). Other ranks get the state with empty model and
        optimizer entries. Unsharded models return ``trainer.state_dict()`` unchanged.
        """
        trainer = self.trainer
        state = trainer.state_dict()
        model = trainer.raw_model
        if not is_sharded(model):
            return state
        state["model"] = full_model_state_dict(model)
        if trainer.optimizer is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            full = get_optimizer_state_dict(
                model, trainer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            state["optimizer"] = native_optimizer_state(full) if current_rank() == 0 else {}
        return state


# ======================================================================================
# State dict helpers (also used by the DCP checkpoint format)
# ======================================================================================
def native_optimizer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Turn an optimizer state keyed by parameter names (``get_optimizer_state_dict``) into
    ``torch.optim.Optimizer.state_dict()``'s own layout, keyed by position, which a plain
    optimizer over the unsharded model loads with ``load_state_dict``."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**group, "params": ids})
    return {"state": {index[name]: dict(value) for name, value in state["state"].items()}, "param_groups": groups}


def _named_state(state: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Inverse of :func:`native_optimizer_state`, given the parameter names in optimizer order."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: dict(v) for i, v in state["state"].items()}, "param_groups": groups}


def _optimizer_snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[list[str], dict[str, Any]]:
    """The names of the optimizer's parameters in its order, and its state (full tensors)."""
    if optimizer is None:
        return [], {}
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in name_of:
                raise TrainerConfigError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not in the model; FSDP "
                    "replaces the model's parameters by shards and can only re-point the optimizer at the "
                    "model's own. To fix, build the optimizer from model.parameters() only."
                )
            names.append(name_of[id(p)])
    return names, (optimizer.state_dict() if optimizer.state else {})


def _rebind_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, before: tuple[list[str], dict[str, Any]]) -> None:
    """Point ``optimizer`` at the sharded parameters that replaced the ones it was built with."""
    names, state = before
    sharded = dict(model.named_parameters())
    position = iter(names)
    for group in optimizer.param_groups:
        group["params"] = [sharded[next(position)] for _ in group["params"]]
    optimizer.state.clear()
    if state:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            model, optimizer, _named_state(state, names), options=StateDictOptions(full_state_dict=True)
        )
