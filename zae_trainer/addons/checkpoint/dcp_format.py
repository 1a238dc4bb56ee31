"""``save_format="dcp"``: sharded checkpoints through PyTorch Distributed Checkpoint.

Every rank writes its own shards of the model and optimizer state with
``torch.distributed.checkpoint`` (DCP); nothing is gathered on one process, so a model that
needs FSDP to fit can still be checkpointed, and the checkpoint loads with any number of
ranks (DCP reshards on load), one non-distributed process included.

A checkpoint is a folder::

    epoch0002-step0000016/
        .metadata, __0_0.distcp, __1_0.distcp, ...   DCP: model and optimizer tensors
        zt-checkpoint.json + zt-state.safetensors    rank 0: everything else of the schema
                                                     (progress, scheduler, optimizer hyper-
                                                     parameters, add-on states, history, ...)
        zt-rank00000.json + zt-rank00000.safetensors one per rank: its RNG states and data
        zt-rank00001.json + ...                      position, for an exact resume

Only tensors go through DCP: DCP stores other values by pickling and loads them with
``torch.load(weights_only=False)``, which would let a planted checkpoint run code. Here every
non-tensor value is JSON, and the load planner reads stray pickled entries safely
(``weights_only=True``).

Crash safety, in the sense of :mod:`.manifest`: all ranks write into one temporary folder
(named with :data:`~.atomic.TEMP_MARK` and rank 0's pid); after every rank has finished and
DCP's metadata is written, a barrier; then rank 0 renames the folder into place and only then
adds it to ``manifest.json``. A rank killed in the middle leaves a temporary folder that no
listing picks up (removed by the next run) and the previous checkpoint as the latest.

``async_save=True`` uses ``dcp.async_save`` on a separate gloo group: the tensors are staged
(copied) on the training thread, written in the background, and published (barrier, rename,
manifest) by the state manager's writer thread; the next save, a load and the end of the run
wait for it.

Emergency checkpoints with several ranks: on SIGINT/SIGTERM, yes (the strategy has made every
rank stop after the same batch, so all of them enter the save together); on an exception, no
(one rank's failure says nothing about where the others are; a save would hang until the
collective timeout), with one warning saying why. See :func:`_no_emergency_save_because`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
import torch.distributed as dist

from .atomic import _temp_name, fsync_dir
from ...errors import TrainerConfigError
from .errors import CheckpointCorruptError, CheckpointMismatchError
from .formats import CheckpointFormat, register_format
from .manifest import Entry
from .schema import build_checkpoint
from .tree import join, split

if TYPE_CHECKING:  # pragma: no cover
    from ..state_manager import StateManagerAddon

__all__ = [
    "is_dcp_checkpoint",
    "save_dcp",
    "read_dcp_checkpoint",
    "read_dcp_weights",
    "full_model_state_dict",
    "load_full_model_state_dict",
    "DCP_STATE_JSON",
]

DCP_STATE_JSON = "zt-checkpoint.json"
_METADATA = ".metadata"
_TENSOR_KEYS = ("model", "optimizer")


def is_dcp_checkpoint(path: str) -> bool:
    """Whether ``path`` is a checkpoint folder written with ``save_format="dcp"``."""
    return os.path.isdir(path) and os.path.exists(os.path.join(path, DCP_STATE_JSON))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process: we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _rank_name(rank: int) -> str:
    return f"zt-rank{rank:05d}"


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2's ``fully_shard`` was applied to ``model`` (without importing FSDP if unused)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's complete weights. For a sharded model this is a collective (every rank
    calls it) whose result is complete, on the CPU, on rank 0 and empty elsewhere; otherwise
    it is ``model.state_dict()``."""
    if not is_sharded(model):
        return dict(model.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state_dict(model: torch.nn.Module, weights: Mapping[str, Any], strict: bool = True) -> None:
    """Load complete weights (plain tensors, e.g. from a file) into ``model``, sharded or not.

    A sharded (FSDP2) model holds DTensor shards, which ``load_state_dict`` cannot fill from
    full tensors; ``set_model_state_dict(full_state_dict=True)`` cuts each rank's shard out of
    them. That is a collective: torch distributes every tensor from rank 0 (``src_data_rank=0``),
    so every rank must call this with the same keys and shapes (each rank passing the whole
    dict; the values of rank 0 are the ones loaded). Keys go in the model's order, which is
    the same on every rank. Weights that are already shards (DTensors) load directly.
    """
    if not is_sharded(model):
        model.load_state_dict(weights, strict=strict)
        return
    order = list(model.state_dict())
    ordered = {k: weights[k] for k in order if k in weights}
    ordered.update({k: v for k, v in weights.items() if k not in ordered})
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    if any(isinstance(v, DTensor) for v in ordered.values()):
        model.load_state_dict(ordered, strict=strict)  # shards of this model (a sharded state dict)
        return
    set_model_state_dict(model, ordered, options=StateDictOptions(full_state_dict=True, strict=strict))


# ======================================================================================
# Splitting a checkpoint: tensors of model / optimizer state to DCP, the rest to JSON
# ======================================================================================
def _model_and_optimizer(trainer: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """This rank's model and optimizer state, keyed by parameter name (shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = trainer.raw_model
    optimizer = trainer.optimizer
    weights = get_model_state_dict(model)
    if optimizer is None:
        return weights, None
    missing_grads = [p for g in optimizer.param_groups for p in g["params"] if p.grad is None]
    state = get_optimizer_state_dict(model, optimizer)
    for p in missing_grads:  # an empty optimizer is initialised with zero gradients: leave none behind
        p.grad = None
    return weights, state


def _split_optimizer(state: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(tensors for DCP, plain rest for JSON) of a name-keyed optimizer state."""
    if state is None:
        return {}, None
    tensors: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for name, values in state["state"].items():
        tensors[name] = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
        plain[name] = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
    return tensors, {"state": plain, "param_groups": [dict(g) for g in state["param_groups"]]}


def _write_tree(folder: str, stem: str, tree: Mapping[str, Any]) -> None:
    """``stem.json`` (the tree, tensors replaced by references) and ``stem.safetensors``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    plain = split(dict(tree), lambda key: tensors)
    stored = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # no shared memory
    save_file(stored, os.path.join(folder, stem + ".safetensors"))
    with open(os.path.join(folder, stem + ".json"), "w", encoding="utf-8") as fh:
        json.dump(plain, fh, indent=1, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    fd = os.open(os.path.join(folder, stem + ".safetensors"), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_tree(folder: str, stem: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    json_path = os.path.join(folder, stem + ".json")
    tensor_path = os.path.join(folder, stem + ".safetensors")
    try:
        with open(json_path, encoding="utf-8") as fh:
            plain = json.load(fh)
        tensors = load_file(tensor_path)
    except (OSError, ValueError) as exc:
        raise CheckpointCorruptError(
            f"DCP checkpoint {folder!r}: cannot read {stem}.json / {stem}.safetensors ({type(exc).__name__}: {exc}); "
            "the checkpoint is incomplete or damaged.",
            folder,
        ) from exc

    def tensor_for(key: str) -> torch.Tensor:
        if key not in tensors:
            raise CheckpointCorruptError(f"DCP checkpoint {folder!r}: {stem}.safetensors lacks {key!r}", folder)
        return tensors[key]

    result = join(plain, tensor_for)
    assert isinstance(result, dict)
    return result


# ======================================================================================
# Saving (every rank calls it)
# ======================================================================================
def save_dcp(manager: "StateManagerAddon", reasons: list[str], wait_for_write: bool) -> str | None:
    """Write a sharded checkpoint from every rank; return its path on rank 0 (None elsewhere).

    Every rank must call this at the same point (the state manager's save points are the
    same on every rank). Rank 0 picks the name, all ranks write, rank 0 publishes.
    """
    import torch.distributed.checkpoint as dcp

    trainer = manager.trainer
    writer = manager._writer
    rank, world = _rank(), _world()
    if world > 1 and reasons[0] in ("interrupt", "exception"):
        why = _no_emergency_save_because(trainer, reasons[0])
        if why is not None:  # said before waiting for a background write, which may be what failed
            if not getattr(manager, "_zt_dcp_refusal_warned", False):  # once per state manager
                setattr(manager, "_zt_dcp_refusal_warned", True)
                warnings.warn(f"no emergency checkpoint ({reasons[0]}): {why}", RuntimeWarning, stacklevel=3)
            return None
    writer.wait()  # the previous (async) save is published before the next begins
    if world > 1 and "step" in reasons:
        raise TrainerConfigError(
            "save_every_n_steps with save_format='dcp' and several processes: step checkpoints are taken at rank 0's "
            "log points, which the other ranks do not see, while every rank must write its shards. To fix, use "
            "save_every_n_epochs (or save_last) with dcp."
        )
    manifest = manager._manifest_now()
    pc = trainer.progress_checker
    entry: Entry | None = None
    temp = ""
    if rank == 0:
        at_epoch_end = pc.batch_in_epoch == 0 and bool(trainer.history)
        value = trainer.monitored_value() if at_epoch_end else None
        entry = Entry(
            name=manager._unique_name(manifest, reasons),
            epoch=pc.epoch,
            step=pc.step,
            batch_in_epoch=pc.batch_in_epoch,
            reasons=list(reasons),
            monitor=trainer.monitor_name(),
            value=value if value is not None and math.isfinite(value) else None,
            metrics=dict(trainer.epoch_metrics) if at_epoch_end else {},
        )
        temp = _temp_name(os.path.join(manager.save_path, entry.name))
        os.mkdir(temp)
    if world > 1:
        shared = [entry.name if entry else None, temp]
        dist.broadcast_object_list(shared, src=0)
        name, temp = str(shared[0]), str(shared[1])
    else:
        assert entry is not None
        name = entry.name
    final = os.path.join(manager.save_path, name)
    manager._last_step_saved = pc.step

    checkpoint = build_checkpoint(
        trainer,
        reasons=reasons,
        data_position=manager._data_position(),
        model_config=manager.model_config,
        save_loss_history=getattr(manager, "save_loss_history", False),
    )
    weights, optimizer_state = _model_and_optimizer(trainer)
    optimizer_tensors, optimizer_plain = _split_optimizer(optimizer_state)
    tensors: dict[str, Any] = {"model": weights}
    if optimizer_state is not None:
        tensors["optimizer"] = optimizer_tensors
    per_rank = {"rank": rank, "rng": checkpoint.pop("rng"), "data_position": checkpoint.pop("data_position")}
    common = {k: v for k, v in checkpoint.items() if k not in _TENSOR_KEYS}
    common["optimizer_plain"] = optimizer_plain
    common["dcp"] = {"world_size": world, "torch": torch.__version__}

    if manager.async_save and not wait_for_write:
        group = _checkpoint_group(manager)
        future = dcp.async_save(tensors, checkpoint_id=temp, process_group=group)
        _write_tree(temp, _rank_name(rank), per_rank)
        if rank == 0:
            _write_tree(temp, DCP_STATE_JSON[: -len(".json")], common)

        def finish() -> None:
            future.result()
            _publish(manager, entry, temp, final, group)

        writer.submit(final, finish)
        return final if rank == 0 else None
    with _quiet_single_process():
        dcp.save(tensors, checkpoint_id=temp, no_dist=world == 1)
    _write_tree(temp, _rank_name(rank), per_rank)
    if rank == 0:
        _write_tree(temp, DCP_STATE_JSON[: -len(".json")], common)
    _publish(manager, entry, temp, final, None)
    return final if rank == 0 else None


def _no_emergency_save_because(trainer: Any, reason: str) -> str | None:
    """Why several ranks cannot write an emergency checkpoint now (None: they can).

    A dcp save is a collective: every rank must enter it at the same step. A signal is agreed
    by the ranks first (MultiGPUAddon / FSDPAddon / AccelerateAddon stop every rank at the same
    batch boundary, see :mod:`~zae_trainer.addons.distributed.stop`), so all of them reach
    ``Event.INTERRUPT`` together and can save. An exception is raised by one rank on its own:
    the others may be fine, failing elsewhere, or blocked in a collective this rank never joins.
    """
    if reason == "exception":
        return (
            "a sharded (dcp) checkpoint is written by every rank together, and a rank that raised cannot know "
            "whether the others are at the same step, failing too, or waiting in a collective it will never join; "
            "trying would hang until the collective timeout. The last checkpoint all ranks finished is intact: "
            "resume from it (resume='latest'). SIGINT/SIGTERM are agreed by all ranks and do get an emergency "
            "dcp checkpoint."
        )
    from ...trainer import Trainer

    if type(trainer).agree_to_stop is Trainer.agree_to_stop:
        return (
            "this process group has several ranks but no strategy that makes them agree on stopping (each rank "
            "stops at its own batch), so they cannot write one checkpoint together. To fix, train through "
            "MultiGPUAddon or FSDPAddon, whose ranks stop at the same batch for a signal."
        )
    return None


def _checkpoint_group(manager: Any) -> Any:
    """A gloo group for background checkpoint collectives, apart from training's (created once).

    Its timeout is the strategy's ``collective_timeout`` (when there is one), so a rank that
    died mid-save ends the others' background write in bounded time, not after 30 minutes.
    """
    if not _distributed():
        return None
    default = dist.distributed_c10d._get_default_group()
    owner, group = getattr(manager, "_zt_dcp_group", (None, None))
    if group is None or owner is not default:  # none yet, or made in a process group destroyed since
        import datetime

        seconds = next((float(a.collective_timeout) for a in manager.trainer.addon_instances
                        if isinstance(getattr(a, "collective_timeout", None), (int, float))), None)
        timeout = datetime.timedelta(seconds=seconds) if seconds is not None else None
        group = dist.new_group(backend="gloo", timeout=timeout)
        manager._zt_dcp_group = (default, group)
    return group


def _publish(manager: Any, entry: Entry | None, temp: str, final: str, group: Any) -> None:
    """After every rank's files are on disk: rank 0 renames the folder, then names it in the
    manifest and applies retention (as the state manager does for its own formats)."""
    from .atomic import mark_for_deletion, remove_path

    if _distributed():
        dist.barrier(group=group)
    if entry is not None:  # rank 0
        fsync_dir(temp)
        os.rename(temp, final)
        fsync_dir(manager.save_path)
        manifest = manager._manifest_now()
        manifest.add(entry)
        dropped = manifest.retain(manager.keep_last, manager._retention_monitors(), manager.keep_periodic)
        manager._update_links(manifest)
        marked = [mark_for_deletion(os.path.join(manager.save_path, old.name)) for old in dropped]
        manifest.write()
        for old in marked:  # only once no manifest names them
            remove_path(old)
    if _distributed():
        dist.barrier(group=group)  # published before any rank goes on
        if entry is None:  # the other ranks see what rank 0 wrote, so they decide "best" alike
            manager._manifest = manager._load_manifest()


# ======================================================================================
# Loading
# ======================================================================================
def _safe_planner(allow_partial: bool) -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner, but pickled entries load with ``weights_only=True``."""

        def load_bytes(self, read_item: Any, value: Any) -> None:
            from torch.distributed.checkpoint._traverse import set_element

            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeLoadPlanner(allow_partial_load=allow_partial)


def read_dcp_checkpoint(path: str, trainer: Any, strict: bool = True) -> dict[str, Any]:
    """Load a DCP checkpoint's model and optimizer state into ``trainer`` (resharding to this
    run's ranks) and return the rest of the checkpoint, for ``apply_checkpoint``.

    Every rank must call it. The returned ``"model"`` holds the loaded (this rank's) weights
    and ``"optimizer"`` is None (already applied); ``"rng"`` and ``"data_position"`` are this
    rank's, or rank 0's when the checkpoint was written by fewer ranks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    if not os.path.exists(os.path.join(path, _METADATA)):
        raise CheckpointCorruptError(f"{path!r} has no DCP {_METADATA}: the checkpoint is incomplete.", path)
    common = _read_tree(path, DCP_STATE_JSON[: -len(".json")])
    saved_world = int((common.get("dcp") or {}).get("world_size", 1))
    rank, world = _rank(), _world()
    own = rank if rank < saved_world else 0
    per_rank = _read_tree(path, _rank_name(own))
    if world != saved_world and rank == 0:
        warnings.warn(
            f"{path!r} was written by {saved_world} process(es) and is loaded by {world}: weights and optimizer "
            "state are resharded exactly, but random streams and a mid-epoch data position continue from rank "
            f"{0 if world > saved_world else 'r'}'s, so the run will not repeat the original one step for step.",
            RuntimeWarning,
            stacklevel=3,
        )

    model = trainer.raw_model
    optimizer = trainer.optimizer
    weights, optimizer_state = _model_and_optimizer(trainer)
    plain = common.get("optimizer_plain")
    tensors: dict[str, Any] = {"model": weights}
    use_optimizer = optimizer is not None and plain is not None
    if use_optimizer:
        tensors["optimizer"] = _split_optimizer(optimizer_state)[0]
    try:
        with _quiet_single_process():
            dcp.load(tensors, checkpoint_id=path, planner=_safe_planner(allow_partial=not strict), no_dist=world == 1)
    except Exception as exc:  # DCP raises CheckpointException / RuntimeError naming the missing keys
        raise CheckpointMismatchError(
            f"could not load {path!r} into this model: {type(exc).__name__}: {str(exc).strip()[:800]}. To fix, build "
            "the same model architecture (and optimizer) that saved it, or pass strict=False.",
            path,
        ) from exc
    set_model_state_dict(model, tensors["model"], options=StateDictOptions(strict=strict))
    if use_optimizer:
        assert plain is not None and optimizer is not None
        state = {
            name: {**plain["state"].get(name, {}), **values} for name, values in tensors["optimizer"].items()
        }
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": plain["param_groups"]})
        optimizer.zero_grad(set_to_none=True)
    checkpoint = {k: v for k, v in common.items() if k not in ("optimizer_plain", "dcp")}
    checkpoint["model"] = tensors["model"]
    checkpoint["optimizer"] = None
    checkpoint["rng"] = per_rank["rng"]
    checkpoint["data_position"] = per_rank["data_position"]
    return checkpoint


def read_dcp_weights(path: str) -> dict[str, torch.Tensor]:
    """The full model weights of a DCP checkpoint, assembled in this one process.

    Needs no process group and no model (for export and evaluation); holds the whole model in
    CPU memory.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if not os.path.exists(os.path.join(path, _METADATA)):
        raise CheckpointCorruptError(f"{path!r} has no DCP {_METADATA}: the checkpoint is incomplete.", path)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys={"model"}),
                     no_dist=True)
    return dict(state.get("model", {}))



def _read_alone(path: str) -> dict[str, Any]:
    """The checkpoint as one process sees it without a model: full weights, rank 0's RNG and
    data position, no optimizer state (that is loaded into an optimizer by the state
    manager, which reshards it). Serves ``read_checkpoint`` and ``read_weights``."""
    common = _read_tree(path, DCP_STATE_JSON[: -len(".json")])
    per_rank = _read_tree(path, _rank_name(0))
    checkpoint = {k: v for k, v in common.items() if k not in ("optimizer_plain", "dcp")}
    checkpoint["model"] = read_dcp_weights(path)
    checkpoint["optimizer"] = None
    checkpoint["rng"] = per_rank["rng"]
    checkpoint["data_position"] = per_rank["data_position"]
    return checkpoint


def _write_elsewhere(path: str, checkpoint: Mapping[str, Any]) -> None:
    raise TrainerConfigError(
        f"a 'dcp' checkpoint ({path!r}) is written by every rank together through the state manager "
        "(StateManagerAddon(save_format='dcp')), not from one checkpoint dict. To fix, save through the trainer "
        "(trainer.save_state()) or choose save_format='ckpt' / 'safetensors' for a single file."
    )


register_format(CheckpointFormat("dcp", _write_elsewhere, _read_alone, suffix="", owns=is_dcp_checkpoint))
