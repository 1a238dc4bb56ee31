"""Per-rank scenarios of the FSDP tests, run in real processes over gloo.

The test starts two processes with :func:`launch`; each joins a process group of its own
making (the "existing process group" launch mode of FSDPAddon) and runs one scenario, writing
what it saw under ``out`` for the test to compare.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fsdp_helpers import stack_loader, stack_trainer  # noqa: E402
from zae_trainer import AddOn  # noqa: E402
from zae_trainer.addons.checkpoint.dcp_format import full_model_state_dict  # noqa: E402
from zae_trainer.addons.clipping import GradientClippingAddon  # noqa: E402
from zae_trainer.addons.distributed.fsdp import FSDPAddon  # noqa: E402
from zae_trainer.addons.state_manager import StateManagerAddon  # noqa: E402

SETTINGS = {"accumulate_grad_batches": 2, "max_norm": 0.05, "collective_timeout": 20.0}


def _local(trainer: Any) -> dict[str, Any]:
    """This rank's shards of the parameters and optimizer state, as plain tensors."""

    def plain(t: Any) -> Any:
        return t.to_local().clone() if hasattr(t, "to_local") else (t.clone() if isinstance(t, torch.Tensor) else t)

    params = {n: plain(p.detach()) for n, p in trainer.raw_model.named_parameters()}
    state = trainer.optimizer.state_dict()["state"]
    optimizer = {i: {k: plain(v) for k, v in s.items()} for i, s in state.items()}
    return {"params": params, "optimizer": optimizer, "step": trainer.progress_checker.step}


def resume(rank: int, out: str) -> None:
    """Uninterrupted 4 epochs; 2 epochs saved with dcp; resumed for 2 more; exports."""
    ckpt = os.path.join(out, "ckpt")
    train, valid = stack_loader(32, 2, shuffle=True), stack_loader(8, 2, seed=5)

    whole = stack_trainer(FSDPAddon, GradientClippingAddon, **SETTINGS)
    whole.run(4, train, valid)
    full = full_model_state_dict(whole.raw_model)  # collective
    torch.save({"local": _local(whole), "full": full, "metrics": whole.epoch_metrics,
                "model_type": type(whole.model).__name__}, os.path.join(out, f"whole-{rank}.pt"))

    first = stack_trainer(FSDPAddon, StateManagerAddon, GradientClippingAddon, save_path=ckpt, save_format="dcp",
                          keep_last=3, keep_top_k=1, **SETTINGS)
    first.run(2, train, valid)
    first_full = full_model_state_dict(first.raw_model)
    first.export_weights(os.path.join(out, "first.safetensors"))  # every rank: gathers, rank 0 writes
    gathered = first.get_addon(FSDPAddon).gather_trainer_state()  # every rank: what a spawned run sends back
    if rank == 0:
        torch.save({"full": first_full, "gathered": gathered}, os.path.join(out, "first.pt"))

    second = stack_trainer(FSDPAddon, StateManagerAddon, GradientClippingAddon, save_path=ckpt, save_format="dcp",
                           resume="latest", keep_last=3, keep_top_k=1, **SETTINGS)
    second.run(4, train, valid)  # resume="latest" continues the same run: to epoch 4 in all
    torch.save({"local": _local(second), "metrics": second.epoch_metrics}, os.path.join(out, f"resumed-{rank}.pt"))


class KillDuringSave(AddOn):
    """On ``kill_rank``, at the checkpoint of epoch ``at_epoch``: SIGKILL itself while DCP writes its shard."""

    def __init__(self, *, kill_rank: int = 1, at_epoch: int = 2) -> None:
        self.kill_rank = kill_rank
        self.at_epoch = at_epoch

    def on_checkpoint_save(self, trainer: Any, checkpoint: Any) -> None:
        if dist.get_rank() != self.kill_rank or trainer.progress_checker.epoch != self.at_epoch:
            return
        from torch.distributed.checkpoint import FileSystemWriter

        original = FileSystemWriter.write_data

        def write_then_die(writer: Any, plan: Any, planner: Any) -> Any:
            original(writer, plan, planner)  # this rank's shard file is (being) written
            os.kill(os.getpid(), signal.SIGKILL)

        FileSystemWriter.write_data = write_then_die  # type: ignore[method-assign]


def kill(rank: int, out: str) -> None:
    """Save after every epoch; rank 1 is killed inside the second save."""
    trainer = stack_trainer(FSDPAddon, StateManagerAddon, KillDuringSave, GradientClippingAddon,
                            save_path=os.path.join(out, "killed"), save_format="dcp", **SETTINGS)
    trainer.run(3, stack_loader(16, 2), stack_loader(8, 2, seed=5))


def resume_then_kill(rank: int, out: str) -> None:
    """Both in one pair of processes: starting processes is the slow part on a small machine."""
    resume(rank, out)
    kill(rank, out)


SCENARIOS: dict[str, Callable[[int, str], None]] = {"resume": resume, "kill": kill, "resume_then_kill": resume_then_kill}


def _worker(rank: int, name: str | Callable[[int, str], None], out: str, port: int, timeout: float) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        (SCENARIOS[name] if isinstance(name, str) else name)(rank, out)
    except BaseException as exc:
        with open(os.path.join(out, f"error-{rank}.txt"), "w") as fh:
            fh.write(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def launch(name: str | Callable[[int, str], None], out: str, timeout: float = 20.0,
           deadline: float = 240.0) -> list[int | None]:
    """Run scenario ``name`` (or a module-level function ``(rank, out)``) on two processes;
    return their exit codes (None: still running, killed)."""
    import time

    import torch.multiprocessing as mp

    from zae_trainer.addons.distributed.env import free_port

    from ddp_helpers import fast_start_method

    context = mp.start_processes(_worker, args=(name, out, free_port(), timeout), nprocs=2, join=False,
                                 start_method=fast_start_method())
    end = time.monotonic() + deadline
    for process in context.processes:
        process.join(max(0.0, end - time.monotonic()))
    codes = [p.exitcode for p in context.processes]
    for process in context.processes:
        if process.is_alive():
            process.kill()
            process.join()
    return codes
