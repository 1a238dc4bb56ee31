"""More per-rank FSDP scenarios (for tests/test_fsdp_extras.py), in real gloo processes.

:func:`settings_and_signals` runs, in one pair of processes, the runs whose process group
survives them: FSDP's bf16 mixed precision with ``async_save`` (rank 1's write held back
while rank 0 trains on and looks at the folder) and a resume, ``save_model`` /
``export_weights`` from the sharded model, CPU offload saved and resumed (then checkpointed
weights loaded into that sharded model: ``apply_weights``, ``test(weights=...)``), and SIGTERM sent
to both ranks (an emergency dcp checkpoint). It ends with rank 1 raising, which ends the
group. :func:`kill_during_async_save` needs a pair of its own: rank 1 is SIGKILLed while
its background write runs. What each rank saw is written under ``out`` for the test.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ddp_helpers import FailAt  # noqa: E402
from fsdp_helpers import stack_loader, stack_trainer  # noqa: E402
from scenarios import _local  # noqa: E402
from zae_trainer import AddOn  # noqa: E402
from zae_trainer.addons.checkpoint.dcp_format import full_model_state_dict  # noqa: E402
from zae_trainer.addons.distributed.fsdp import FSDPAddon  # noqa: E402
from zae_trainer.addons.state_manager import StateManagerAddon  # noqa: E402

SETTINGS = {"accumulate_grad_batches": 2, "collective_timeout": 20.0}
RELEASE = "release-rank1-write"  # the file that lets rank 1's held-back write go on


def _loaders() -> tuple[Any, Any]:
    return stack_loader(16, 2, shuffle=True), stack_loader(8, 2, seed=5)


def _dcp(path: str, **more: Any) -> dict[str, Any]:
    return {"save_path": path, "save_format": "dcp", "keep_last": 3, "keep_top_k": 1, **more}


def _listed(folder: str) -> list[str]:
    """The checkpoints ``manifest.json`` names (none before the first is published)."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [c["name"] for c in json.load(fh)["checkpoints"]]


def _save(obj: Any, out: str, name: str) -> None:
    torch.save(obj, os.path.join(out, name))


# ======================================================================================
# Mixed precision and CPU offload, each saved and resumed
# ======================================================================================
def _policies(trainer: Any) -> dict[str, str]:
    group = trainer.raw_model._get_fsdp_state()._fsdp_param_group
    return {"mp": repr(group.mp_policy), "offload": type(group.offload_policy).__name__}


def offload(rank: int, out: str) -> Any:
    train, valid = _loaders()
    folder = os.path.join(out, "offload")
    stack_trainer(FSDPAddon, StateManagerAddon, cpu_offload=True, **_dcp(folder), **SETTINGS).run(2, train, valid)
    resumed = stack_trainer(FSDPAddon, StateManagerAddon, cpu_offload=True, **_dcp(folder, resume="latest"),
                            **SETTINGS)
    resumed.run(4, train, valid)
    full = full_model_state_dict(resumed.raw_model)
    _save({"full": full, "metrics": resumed.epoch_metrics, "policies": _policies(resumed)}, out,
          f"offload-{rank}.pt")
    return resumed


# ======================================================================================
# async_save: held back on rank 1, looked at by rank 0 meanwhile
# ======================================================================================
class HoldRank1Write(AddOn):
    """Rank 1's first background dcp write waits for ``RELEASE``; rank 0, two batches into
    the next epoch (training on while that write is pending), records what the folder shows
    and then creates ``RELEASE``."""

    name = "hold_rank1_write"

    def __init__(self, *, out_dir: str) -> None:
        self.out_dir = out_dir
        self.held = False
        self.seen: dict[str, Any] | None = None

    def on_checkpoint_save(self, trainer: Any, checkpoint: Any) -> None:
        if dist.get_rank() != 1 or self.held:
            return
        self.held = True
        from torch.distributed.checkpoint import FileSystemWriter

        original = FileSystemWriter.write_data
        release = os.path.join(self.out_dir, RELEASE)

        def held_write(writer: Any, plan: Any, planner: Any) -> Any:
            FileSystemWriter.write_data = original  # type: ignore[method-assign]
            deadline = time.monotonic() + 60.0
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.01)
            return original(writer, plan, planner)

        FileSystemWriter.write_data = held_write  # type: ignore[method-assign]

    def on_train_batch_end(self, trainer: Any) -> None:
        pc = trainer.progress_checker
        if dist.get_rank() != 0 or self.seen is not None or pc.epoch != 1 or pc.batch_in_epoch != 2:
            return
        manager = trainer.get_addon("state_manager")
        folder = manager.save_path
        listed = _listed(folder)
        temps = [n for n in os.listdir(folder) if ".zt-tmp-" in n]
        self.seen = {
            "step": pc.step,
            "writer_busy": manager._writer.busy,
            "listed": listed,
            "entries": sorted(n for n in os.listdir(folder) if not n.startswith(".")),
            "temp_files": {t: sorted(os.listdir(os.path.join(folder, t))) for t in temps},
        }
        with open(os.path.join(self.out_dir, RELEASE), "w"):
            pass


def bf16_async_then_exports(rank: int, out: str) -> None:
    """bf16 mixed precision, 4 epochs in one go; then 2 epochs with async dcp saves (rank 1's
    first write held back), resumed to 4; then the weights of the sharded model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    train, valid = _loaders()
    bf16 = {"mixed_precision": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
    whole = stack_trainer(FSDPAddon, **bf16, **SETTINGS)
    whole.run(4, train, valid)
    full = full_model_state_dict(whole.raw_model)
    output = whole.model(torch.zeros(2, 4)).dtype  # gathered in bf16: the forward computes in bf16
    _save({"local": _local(whole), "full": full, "metrics": whole.epoch_metrics, "policies": _policies(whole),
           "output_dtype": str(output), "param_dtypes": sorted({str(p.dtype) for p in whole.model.parameters()}),
           "first_loss": whole.history[0]["train/loss"]}, out, f"bf16-whole-{rank}.pt")

    folder = os.path.join(out, "async")
    first = stack_trainer(FSDPAddon, StateManagerAddon, HoldRank1Write, **bf16, **_dcp(folder, async_save=True),
                          out_dir=out, **SETTINGS)
    first.run(2, train, valid)
    listed = _listed(folder)
    _save({"seen": first.get_addon("hold_rank1_write").seen, "listed_after": listed,
           "published": {n: sorted(os.listdir(os.path.join(folder, n))) for n in listed}}, out, f"async-{rank}.pt")
    resumed = stack_trainer(FSDPAddon, StateManagerAddon, **bf16, **_dcp(folder, resume="latest", async_save=True),
                            **SETTINGS)
    resumed.run(4, train, valid)
    _save({"local": _local(resumed), "metrics": resumed.epoch_metrics}, out, f"bf16-resumed-{rank}.pt")

    # Weights of a sharded model, written by every rank together (rank 0 writes the file).
    full = full_model_state_dict(resumed.raw_model)
    paths = [resumed.save_model(os.path.join(out, name)) for name in ("model.safetensors", "model.pt")]
    paths.append(resumed.export_weights(os.path.join(out, "export.safetensors")))
    _save({"full": full, "paths": paths}, out, f"weights-{rank}.pt")


# ======================================================================================
# SIGTERM to both ranks; then rank 1 raises
# ======================================================================================
class TermBoth(AddOn):
    """Rank 0 sends SIGTERM to both ranks' processes after batch ``at_batch`` of epoch 2."""

    name = "term_both"

    def __init__(self, *, pids: list[int], at_batch: int = 1) -> None:
        self.pids = pids
        self.at_batch = at_batch
        self.sent = False

    def on_train_batch_end(self, trainer: Any) -> None:
        pc = trainer.progress_checker
        if dist.get_rank() == 0 and not self.sent and pc.epoch == 1 and pc.batch_in_epoch == self.at_batch:
            self.sent = True
            for pid in reversed(self.pids):  # the other rank first, this one last
                os.kill(pid, signal.SIGTERM)


def sigterm_then_crash(rank: int, out: str) -> None:
    train, valid = _loaders()
    pids: list[Any] = [None, None]
    dist.all_gather_object(pids, os.getpid())
    folder = os.path.join(out, "term")
    term = stack_trainer(FSDPAddon, StateManagerAddon, TermBoth, **_dcp(folder), pids=pids, handle_signals=True,
                         accumulate_grad_batches=1, collective_timeout=20.0)
    code = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            term.run(4, train, valid)
        except SystemExit as exc:  # TrainingTerminated
            code = exc.code
    full = full_model_state_dict(term.raw_model)  # the group is intact: the ranks stopped together
    latest = _listed(folder)[-1]
    _save({"code": code, "status": term.summary.status, "step": term.progress_checker.step, "latest": latest,
           "full": full, "warnings": [str(w.message) for w in caught]}, out, f"term-{rank}.pt")
    again = stack_trainer(FSDPAddon, StateManagerAddon, **_dcp(os.path.join(out, "term-again"),
                                                               resume=os.path.join(folder, latest)),
                          accumulate_grad_batches=1, collective_timeout=20.0)
    again.run(4, train, valid)
    _save({"step": again.progress_checker.step, "status": again.summary.status}, out, f"term-again-{rank}.pt")

    # Rank 1 raises at the first batch of epoch 2 (a consistent state: the emergency save is
    # refused for the reason, not for an inconsistency). The group does not survive this.
    folder = os.path.join(out, "crash")
    crash = stack_trainer(FSDPAddon, StateManagerAddon, FailAt, **_dcp(folder), fail_rank=1, fail_batch=5,
                          **SETTINGS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            crash.run(3, train, valid)
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            error = ""
    _save({"error": error, "warnings": [str(w.message) for w in caught]}, out, f"crash-{rank}.pt")
    if rank == 1:  # leave at once, closing the connection the other rank waits on
        os._exit(3)


# ======================================================================================
# Checkpointed weights loaded into a sharded model (apply_weights, test(weights=...))
# ======================================================================================
TEST_LOADER = {"n": 8, "batch_size": 2, "seed": 7}
ONE_CKPT = "one-process.ckpt"  # a save_format='ckpt' checkpoint the test wrote in one process
BAD_WEIGHTS = "bad-weights.pt"  # weights of another model, also written by the test


def best_weights(rank: int, out: str, trainer: Any) -> None:
    """On ``trainer``'s trained sharded model (its dcp folder holds a best checkpoint): test()
    with that best and with a one-process ckpt file (the weights put back after each),
    apply_weights of both, and weights of another model."""
    from zae_trainer.addons.checkpoint.errors import CheckpointMismatchError

    loader = stack_loader(**TEST_LOADER)
    one = os.path.join(out, ONE_CKPT)
    before = full_model_state_dict(trainer.raw_model)
    tested = {"best": trainer.test(loader, weights="best"), "ckpt": trainer.test(loader, weights=one)}
    after_test = full_model_state_dict(trainer.raw_model)
    try:
        trainer.apply_weights(os.path.join(out, BAD_WEIGHTS))
        mismatch = ""
    except CheckpointMismatchError as exc:
        mismatch = str(exc)
    loaded = {}
    for name, source in (("ckpt", one), ("best", "best")):
        trainer.apply_weights(source)
        loaded[name] = full_model_state_dict(trainer.raw_model)
    _save({"before": before, "after_test": after_test, "tested": tested, "loaded": loaded, "mismatch": mismatch,
           "sharded": type(trainer.raw_model).__name__}, out, f"best-{rank}.pt")


def settings_and_signals(rank: int, out: str) -> None:
    bf16_async_then_exports(rank, out)
    best_weights(rank, out, offload(rank, out))  # on the offload run's trainer and dcp folder
    sigterm_then_crash(rank, out)


# ======================================================================================
# SIGKILL during a background write
# ======================================================================================
class KillInBackgroundWrite(AddOn):
    """On rank 1, at the dcp save of epoch ``at_epoch``: SIGKILL inside the background write."""

    name = "kill_in_background_write"

    def __init__(self, *, at_epoch: int = 2) -> None:
        self.at_epoch = at_epoch

    def on_checkpoint_save(self, trainer: Any, checkpoint: Any) -> None:
        if dist.get_rank() != 1 or trainer.progress_checker.epoch != self.at_epoch:
            return
        import threading

        from torch.distributed.checkpoint import FileSystemWriter

        original = FileSystemWriter.write_data
        main = threading.main_thread()

        def write_then_die(writer: Any, plan: Any, planner: Any) -> Any:
            assert threading.current_thread() is not main  # the background write, not the loop
            original(writer, plan, planner)
            os.kill(os.getpid(), signal.SIGKILL)

        FileSystemWriter.write_data = write_then_die  # type: ignore[method-assign]


def kill_during_async_save(rank: int, out: str) -> None:
    train, valid = _loaders()
    trainer = stack_trainer(FSDPAddon, StateManagerAddon, KillInBackgroundWrite,
                            **_dcp(os.path.join(out, "async-killed"), async_save=True), **SETTINGS)
    error = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.run(4, train, valid)
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            _save({"error": error, "warnings": [str(w.message) for w in caught]}, out, f"async-killed-{rank}.pt")
