"""The trainer starting one process per device itself (zae-engine's ``device=[...]`` style).

How the user's trainer reaches the workers
------------------------------------------
``MultiGPUAddon`` records the arguments the trainer was constructed with. When ``run()``
spawns, the parent writes one private job file (``torch.save``) holding the trainer class
(built classes pickle by recipe: the user's class plus its add-ons and their settings), the
constructor arguments (model, optimizer, scheduler, settings), the trainer's current
``state_dict()`` (so progress, history and add-on state carry over), the ``run()`` arguments
(loaders included) and the parent's RNG states. Each worker joins the process group, builds
the trainer again from the same arguments with its own device, loads that state, restores the
RNG states and calls ``run()``. So everything passed to the constructor and to ``run()`` must
pickle: define trainer classes, datasets and collate functions at module level.

How the trained state comes back
--------------------------------
When the workers finish, rank 0 writes its trainer's ``state_dict()`` (unwrapped model
weights, optimizer, scheduler, progress, history, best, add-on states), its final epoch
metrics and its run summary to a result file in the same private folder; the parent loads
it into its own trainer with ``load_state_dict``. After ``run()`` returns, the caller's
trainer therefore holds the trained weights, ``epoch_metrics``, ``history`` and ``summary``.
Events (and so the add-ons' side effects: logs, checkpoints) happen in the workers, on
rank 0; none fire in the parent.

Faults
------
A worker that raises records its rank, the time and the exception, then exits; the launcher
stops the other workers (a grace period, then SIGTERM, then SIGKILL) and raises
:class:`DistributedWorkerError` naming the rank that failed first and its error (the original
exception is the ``__cause__`` when it can be rebuilt). The private folder is removed and no
worker outlives ``run()``, whatever happened.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
import traceback
import types
from datetime import timedelta
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from ...display import RunSummary
from ...errors import TrainerConfigError
from .env import WorkerContext, set_worker_context

__all__ = ["DistributedWorkerError", "SpawnPlan", "launch"]

_JOB = "job.pt"
_RESULT = "result.pt"
_GRACE_SECONDS = 5.0  # how long failing workers get to exit by themselves before SIGTERM / SIGKILL


class DistributedWorkerError(RuntimeError):
    """A spawned worker failed; raised in the process that called ``run()``.

    Attributes
    ----------
    rank : int
        The rank that failed first.
    world_size : int
        How many workers there were (all of them are stopped).
    original_type, original_message : str
        The worker's exception, by type name and message.
    remote_traceback : str
        The worker's traceback, as text.
    """

    def __init__(
        self, rank: int, world_size: int, original_type: str, original_message: str, remote_traceback: str
    ) -> None:
        detail = f"{original_type}: {original_message}" if original_message else original_type
        super().__init__(
            f"rank {rank} of {world_size} failed with {detail}. The other ranks were stopped.\n"
            f"--- traceback of rank {rank} ---\n{remote_traceback.rstrip()}"
        )
        self.rank = rank
        self.world_size = world_size
        self.original_type = original_type
        self.original_message = original_message
        self.remote_traceback = remote_traceback


@dataclasses.dataclass(frozen=True)
class SpawnPlan:
    """How to start the workers: decided by the add-on, carried out by :func:`launch`."""

    devices: Sequence[torch.device]  # one per rank
    backend: str
    init_method: str
    timeout: timedelta
    start_method: str = "spawn"

    @property
    def world_size(self) -> int:
        return len(self.devices)


# ======================================================================================
# Parent side
# ======================================================================================
def launch(
    trainer: Any,
    call: tuple[tuple[Any, ...], dict[str, Any]],
    plan: SpawnPlan,
    run_args: tuple[int, Any, Any, Mapping[str, Any]],
) -> None:
    """Run ``trainer.run(*run_args)`` in ``plan.world_size`` worker processes; load the result."""
    folder = tempfile.mkdtemp(prefix="zae-ddp-")
    try:
        _write_job(folder, trainer, call, plan, run_args)
        context = mp.start_processes(
            _worker, args=(folder,), nprocs=plan.world_size, join=False, start_method=plan.start_method
        )
        try:
            while not context.join(timeout=0.5, grace_period=_GRACE_SECONDS):
                pass
        except ProcessException as exc:
            error = _worker_error(folder, plan.world_size, exc)
            raise error from _original_exception(folder, error.rank) or exc
        finally:
            _stop(context.processes)
        _apply_result(folder, trainer, run_args)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_job(
    folder: str,
    trainer: Any,
    call: tuple[tuple[Any, ...], dict[str, Any]],
    plan: SpawnPlan,
    run_args: tuple[int, Any, Any, Mapping[str, Any]],
) -> None:
    n_epoch, loader, valid_loader, run_kwargs = run_args
    job = {
        "cls": type(trainer),
        "args": call[0],
        "kwargs": call[1],
        "state": trainer.state_dict(),
        "run": (n_epoch, loader, valid_loader, dict(run_kwargs)),
        "plan": plan,
        "rng": _capture_rng(),
    }
    _refuse_objects_from_interactive_main(job, plan)
    try:
        torch.save(job, os.path.join(folder, _JOB))
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise TrainerConfigError(
            f"MultiGPUAddon could not send the trainer to its worker processes: {type(exc).__name__}: {exc}. "
            "Spawning rebuilds the trainer in each process, so the trainer class, the constructor arguments "
            "(model, optimizer, scheduler, settings) and run()'s loaders must pickle. To fix, define classes, "
            "datasets and collate functions at module level (not inside a function, not as lambdas), or start "
            "the processes yourself with torchrun, where nothing needs to pickle."
        ) from exc


class _MainReferenceFinder(pickle.Pickler):
    """Pickles into nothing, noting the classes and functions that live in ``__main__``.

    Tensor storages are replaced by a placeholder, so that finding them costs no copy."""

    def __init__(self) -> None:
        super().__init__(_Discard(), protocol=pickle.HIGHEST_PROTOCOL)
        self.found: dict[str, None] = {}

    def reducer_override(self, obj: Any) -> Any:
        owner = obj if isinstance(obj, (type, types.FunctionType)) else type(obj)
        if getattr(owner, "__module__", None) == "__main__":
            self.found[getattr(owner, "__qualname__", repr(owner))] = None
        return NotImplemented

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, (torch.UntypedStorage, torch.TypedStorage)):
            return "storage"
        return None


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def _refuse_objects_from_interactive_main(job: Mapping[str, Any], plan: SpawnPlan) -> None:
    """Before any process starts: refuse a job that names classes or functions defined in a
    notebook (or ``python -c``), which spawned workers cannot import, with what to do instead."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__file__", None):
        return  # a script: workers import its classes from the file
    finder = _MainReferenceFinder()
    try:
        finder.dump(job)
    except Exception:  # an unpicklable job: _write_job reports it, with its own advice
        pass
    if finder.found:
        names = ", ".join(list(finder.found)[:8])
        raise TrainerConfigError(
            f"MultiGPUAddon cannot start {plan.world_size} worker processes from this notebook or interactive "
            f"session: {names} {'is' if len(finder.found) == 1 else 'are'} defined in it (module __main__, which "
            f"has no file), and the '{plan.start_method}' start method rebuilds the trainer in fresh processes "
            "that can only import classes from files. Nothing was started. To fix, either move those "
            "definitions into a .py module next to the notebook and import them from there, or put the "
            "training in a script and launch it with torchrun (torchrun --nproc-per-node=N train.py). "
            "('fork' is not offered: forking a process that has started CUDA is unsafe.)"
        )


def _stop(processes: Sequence[Any]) -> None:
    """No worker outlives the launcher: SIGTERM, a grace period, then SIGKILL."""
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + _GRACE_SECONDS
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in alive:
        if p.is_alive():
            p.kill()
            p.join()


def _records(folder: str) -> list[dict[str, Any]]:
    found = []
    for name in os.listdir(folder):
        if name.startswith("error-rank") and name.endswith(".pkl"):
            try:
                with open(os.path.join(folder, name), "rb") as fh:
                    found.append(pickle.load(fh))
            except (OSError, EOFError, pickle.UnpicklingError):
                continue  # a worker killed while writing it: the torch exception still tells
    return sorted(found, key=lambda r: r["time"])


def _worker_error(folder: str, world_size: int, exc: Exception) -> DistributedWorkerError:
    """The error of the rank that failed first (others usually fail because it did)."""
    records = _records(folder)
    if records:
        first = records[0]
        return DistributedWorkerError(first["rank"], world_size, first["type"], first["message"], first["traceback"])
    rank = int(getattr(exc, "error_index", -1))
    return DistributedWorkerError(rank, world_size, type(exc).__name__, str(exc).strip(), str(exc))


def _original_exception(folder: str, rank: int) -> BaseException | None:
    for record in _records(folder):
        if record["rank"] == rank and record.get("pickled") is not None:
            try:
                original = pickle.loads(record["pickled"])
            except Exception:  # an exception type that does not rebuild: the message already says it
                return None
            return original if isinstance(original, BaseException) else None
    return None


def _apply_result(folder: str, trainer: Any, run_args: tuple[int, Any, Any, Mapping[str, Any]]) -> None:
    path = os.path.join(folder, _RESULT)
    if not os.path.exists(path):
        raise DistributedWorkerError(
            0, 0, "MissingResult", "rank 0 exited without reporting its trained state (was it interrupted?)", ""
        )
    # Written by our own rank-0 worker into this private folder a moment ago: trusted.
    result = torch.load(path, map_location="cpu", weights_only=False)
    trainer.load_state_dict(result["state"])
    trainer.epoch_metrics = dict(result["epoch_metrics"])
    trainer.summary = RunSummary(**result["summary"])
    trainer.stop_reason = result["stop_reason"]
    trainer.loader, trainer.valid_loader = run_args[1], run_args[2]


# ======================================================================================
# Worker side
# ======================================================================================
def _worker(rank: int, folder: str) -> None:
    """Entry point of spawned process ``rank`` (module level, so that it pickles)."""
    # The job file was written by the parent process a moment ago, in its private folder.
    job = torch.load(os.path.join(folder, _JOB), map_location="cpu", weights_only=False)
    plan: SpawnPlan = job["plan"]
    device = plan.devices[rank]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    set_worker_context(WorkerContext(rank, plan.world_size, tuple(plan.devices)))
    dist.init_process_group(
        plan.backend, init_method=plan.init_method, rank=rank, world_size=plan.world_size, timeout=plan.timeout
    )
    try:
        args, kwargs = _with_device(job["cls"], job["args"], job["kwargs"], device)
        trainer = job["cls"](*args, **kwargs)
        trainer.load_state_dict(job["state"])
        _restore_rng(job["rng"])
        n_epoch, loader, valid_loader, run_kwargs = job["run"]
        trainer.run(n_epoch, loader, valid_loader, **run_kwargs)
        state = _trained_state(trainer)  # on every rank: a sharded model gathers its state collectively
        if rank == 0:
            _write_result(folder, trainer, state)
    except BaseException as exc:
        _record_error(folder, rank, exc)
        if isinstance(exc, KeyboardInterrupt):
            raise SystemExit(130) from exc  # torch's wrapper would report an interrupted worker as success
        raise
    finally:
        set_worker_context(None)
        dist.destroy_process_group()


def _with_device(
    cls: type, args: tuple[Any, ...], kwargs: dict[str, Any], device: torch.device
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The constructor arguments with ``device`` set to this rank's device, where it is named.

    Building the model straight onto the rank's device keeps every worker off ``cuda:0``.
    When the constructor has no ``device`` parameter, the add-on moves the model afterwards.
    """
    try:
        signature = inspect.signature(cls.__init__)  # type: ignore[misc]
        bound = signature.bind(None, *args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    if "device" in signature.parameters and signature.parameters["device"].kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    ):
        bound.arguments["device"] = device
    else:
        for name, parameter in signature.parameters.items():
            extra = bound.arguments.get(name)
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and isinstance(extra, dict) and "device" in extra:
                bound.arguments[name] = {**extra, "device": device}
    return tuple(bound.args[1:]), dict(bound.kwargs)


def _trained_state(trainer: Any) -> dict[str, Any]:
    """What rank 0 sends back: ``trainer.state_dict()``, or, where an add-on shards the model
    (FSDPAddon), its ``gather_trainer_state()``, which every rank must call."""
    for addon in trainer.addon_instances:
        gather = getattr(addon, "gather_trainer_state", None)
        if gather is not None:
            return gather()  # type: ignore[no-any-return]
    return trainer.state_dict()  # type: ignore[no-any-return]


def _write_result(folder: str, trainer: Any, state: Mapping[str, Any]) -> None:
    result = {
        "state": state,
        "epoch_metrics": dict(trainer.epoch_metrics),
        "summary": dataclasses.asdict(trainer.summary),
        "stop_reason": trainer.stop_reason,
    }
    temp = os.path.join(folder, _RESULT + ".tmp")
    torch.save(result, temp)
    os.replace(temp, os.path.join(folder, _RESULT))


def _record_error(folder: str, rank: int, exc: BaseException) -> None:
    pickled: bytes | None
    try:
        pickled = pickle.dumps(exc)
        pickle.loads(pickled)  # only keep what the parent can rebuild
    except Exception:
        pickled = None
    record = {
        "rank": rank,
        "time": time.time(),
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "pickled": pickled,
    }
    path = os.path.join(folder, f"error-rank{rank}.pkl")
    with open(path + ".tmp", "wb") as fh:
        pickle.dump(record, fh)
    os.replace(path + ".tmp", path)


def _capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    return state


def _restore_rng(state: Mapping[str, Any]) -> None:
    """Workers continue from the parent's random state, as the processes of torchrun all
    run the same seeded script: a seeded run is reproducible, and ranks draw alike."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
