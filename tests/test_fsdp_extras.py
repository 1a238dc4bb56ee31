"""FSDPAddon beyond the basics, in real gloo processes on the CPU: mixed precision, CPU
offload, async dcp saves, weights from a sharded model, SIGTERM and crashes.

Two pairs of processes run everything (:mod:`fsdp_scripts.extras`); each test checks one
property of what they left behind:

* bf16 parameters with fp32 gradient reduction (``MixedPrecisionPolicy``): trains, stays
  within a stated distance of fp32, checkpoints fp32 master weights and resumes bit-identical;
* ``cpu_offload=True`` (``CPUOffloadPolicy``; on the CPU it moves nothing but runs the same
  code): equal to one process at double batch, across a dcp save and resume;
* ``async_save=True``: rank 0 trains on while rank 1's write is held back, and the checkpoint
  is not listed (nor renamed into place, nor has DCP metadata) until every rank finished;
  resuming from it is bit-identical; SIGKILL of a rank inside its background write leaves the
  previous checkpoint loadable;
* ``save_model`` / ``export_weights`` of a sharded model write the full weights;
  ``apply_weights`` / ``test(weights=...)`` load a dcp folder's best or a one-process ckpt
  file into it exactly as one process does (and refuse another model's weights clearly);
* SIGTERM to both ranks: an emergency dcp checkpoint, loadable and resumable; an exception on
  one rank: no emergency save, one warning saying why, the previous checkpoint intact.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ddp_helpers import SetEpoch
from fsdp_helpers import stack_data, stack_loader, stack_trainer, weights
from zae_trainer.addons.checkpoint.formats import read_weights
from zae_trainer.addons.state_manager import StateManagerAddon

RTOL, ATOL = 1e-5, 1e-6  # as in test_fsdp.py: float32 sums in another order
# bf16 keeps 8 bits of mantissa, and Adam turns a gradient's sign into a full-size step, so
# single elements wander (up to 0.02 here); the whole parameter vector stays close: after 8
# steps the bf16 run's distance from the fp32 run was 3.7% of the distance training moved the
# weights, and the epoch losses agreed to 1e-4 relative (measured). Asserted with margins.
BF16_REL_DISTANCE = 0.10
BF16_LOSS_RTOL = 1e-3


@pytest.fixture(scope="module")
def extras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fsdp_scripts.extras import kill_during_async_save, settings_and_signals
    from fsdp_scripts.scenarios import launch

    out = tmp_path_factory.mktemp("fsdp-extras")
    _sources_for_a_sharded_load(out)
    codes = launch(settings_and_signals, str(out), timeout=20.0, deadline=300.0)
    killed = tmp_path_factory.mktemp("fsdp-async-kill")
    kill_codes = launch(kill_during_async_save, str(killed), timeout=20.0, deadline=120.0)
    return {"out": out, "codes": codes, "killed": killed, "kill_codes": kill_codes}


def _sources_for_a_sharded_load(out: Path) -> None:
    """Files the ranks load into their sharded model: a save_format='ckpt' checkpoint written
    by one process (other weights than the ranks' own), and weights of another model."""
    import shutil

    from fsdp_scripts.extras import BAD_WEIGHTS, ONE_CKPT

    one = stack_trainer(StateManagerAddon, save_path=str(out / "one-process"), save_format="ckpt", seed=1)
    one.run(1, stack_loader(16, 4))
    shutil.copyfile(str(one.save_state()), out / ONE_CKPT)
    torch.save({"inp.weight": torch.zeros(3, 3), "extra": torch.zeros(1)}, out / BAD_WEIGHTS)


def _load(path: Path) -> Any:
    assert path.exists(), _errors(path.parent)
    return torch.load(path, weights_only=False)  # written by our own workers a moment ago


def _errors(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(out.glob("error-*.txt"))) or f"no error files in {out}"


@pytest.fixture(scope="module")
def reference() -> Any:
    """4 epochs in one process at twice the per-rank batch, in the sampler order the ranks shared."""
    data = stack_data(16)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=1)  # the loader's seed
    trainer = stack_trainer(SetEpoch, accumulate_grad_batches=2)
    trainer.run(4, DataLoader(data, batch_size=4, sampler=sampler), stack_loader(8, 4, seed=5))
    return trainer


def _same_local(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert a["step"] == b["step"]
    for name, shard in a["params"].items():
        assert torch.equal(b["params"][name], shard), (what, name)
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for index, state in a["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(b["optimizer"][index][key], value), (what, index, key)


def _read_alone(folder: Path) -> Any:
    alone = stack_trainer(StateManagerAddon, save_path=str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # written by 2 processes, loaded by 1
        path = alone.load_state("latest")
    return alone, path


def _listed(folder: Path) -> list[str]:
    return [c["name"] for c in json.loads((folder / "manifest.json").read_text())["checkpoints"]]


# ======================================================================================
# Mixed precision and CPU offload
# ======================================================================================
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bf16_mixed_precision_trains_close_to_fp32(extras: dict[str, Any], reference: Any) -> None:
    out = extras["out"]
    whole = _load(out / "bf16-whole-0.pt")
    assert "param_dtype=torch.bfloat16" in whole["policies"]["mp"] and "reduce_dtype=torch.float32" in whole[
        "policies"]["mp"]
    assert whole["output_dtype"] == "torch.bfloat16"  # the forward really ran in bf16
    assert whole["param_dtypes"] == ["torch.float32"]  # the sharded master copy stays fp32

    fp32, start = weights(reference), weights(stack_trainer())
    assert whole["full"].keys() == fp32.keys() and all(v.dtype == torch.float32 for v in whole["full"].values())
    flat = lambda tensors: torch.cat([tensors[k].flatten() for k in fp32])  # noqa: E731
    distance = (flat(whole["full"]) - flat(fp32)).norm() / (flat(fp32) - flat(start)).norm()
    assert distance < BF16_REL_DISTANCE, float(distance)
    assert whole["metrics"]["train/loss"] < 0.8 * whole["first_loss"]  # it trains
    for name in ("train/loss", "valid/loss"):
        assert whole["metrics"][name] == pytest.approx(reference.epoch_metrics[name], rel=BF16_LOSS_RTOL)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cpu_offload_matches_one_process_across_a_dcp_resume(extras: dict[str, Any], reference: Any) -> None:
    offload = _load(extras["out"] / "offload-0.pt")
    assert offload["policies"]["offload"] == "CPUOffloadPolicy"  # FSDP really ran with the policy
    for name, value in weights(reference).items():
        torch.testing.assert_close(offload["full"][name], value, rtol=RTOL, atol=ATOL, msg=name)
    assert offload["metrics"]["train/loss"] == pytest.approx(reference.epoch_metrics["train/loss"], rel=1e-5)


# ======================================================================================
# async_save
# ======================================================================================
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_async_dcp_save_is_listed_only_after_every_rank_wrote_it(extras: dict[str, Any]) -> None:
    out = extras["out"]
    record = _load(out / "async-0.pt")
    seen = record["seen"]
    # Two batches into epoch 2, rank 0 trained on while rank 1 still held its write of epoch 1:
    assert seen is not None and seen["writer_busy"] and seen["step"] == 3
    assert seen["listed"] == [] and seen["entries"] == []  # not listed, not renamed into place
    [(temp, files)] = seen["temp_files"].items()
    assert temp.startswith(".epoch0001-step0000002")
    assert ".metadata" not in files and "__1_0.distcp" not in files  # rank 1's shard, DCP's metadata: not yet
    # Once the write finished on every rank, it was published; the epoch-2 one likewise.
    assert record["listed_after"] == ["epoch0001-step0000002", "epoch0002-step0000004"]
    published = record["published"]["epoch0001-step0000002"]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "zt-rank00001.json"} <= set(published)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_from_an_async_bf16_dcp_save_is_bit_identical(extras: dict[str, Any]) -> None:
    out = extras["out"]
    for rank in (0, 1):  # 2 epochs with async dcp saves, resumed to 4: the bits of 4 epochs in one go
        _same_local(_load(out / f"bf16-whole-{rank}.pt")["local"], _load(out / f"bf16-resumed-{rank}.pt")["local"],
                    f"rank {rank}")
    assert _load(out / "bf16-resumed-0.pt")["metrics"] == _load(out / "bf16-whole-0.pt")["metrics"]
    # The checkpoints hold the fp32 master weights, not the bf16 copies the forward used.
    final = read_weights(str(out / "async" / "epoch0004-step0000008"))
    full = _load(out / "weights-0.pt")["full"]
    assert final.keys() == full.keys()
    assert all(final[k].dtype == torch.float32 and torch.equal(final[k], v) for k, v in full.items())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_inside_a_background_dcp_write_leaves_the_previous_checkpoint(extras: dict[str, Any]) -> None:
    killed = extras["killed"]
    assert extras["kill_codes"] == [1, -9], (extras["kill_codes"], _errors(killed))  # no hang
    folder = killed / "async-killed"
    assert _listed(folder) == ["epoch0001-step0000002"]
    leftovers = [p.name for p in folder.iterdir() if ".zt-tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(".epoch0002")  # half-written, never listed
    alone, path = _read_alone(folder)
    assert path == str(folder / "epoch0001-step0000002") and alone.progress_checker.step == 2
    # The surviving rank reported the failed background write (as its error, or as a warning
    # when it failed first in a training collective), rather than losing it.
    survivor = _load(killed / "async-killed-0.pt")
    reports = [survivor["error"], *survivor["warnings"]]
    assert any("background write of checkpoint" in r and "epoch0002-step0000004" in r for r in reports), reports


# ======================================================================================
# Weights of a sharded model
# ======================================================================================
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_save_model_and_export_weights_of_a_sharded_model_write_full_weights(extras: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    out = extras["out"]
    record = _load(out / "weights-0.pt")
    assert _load(out / "weights-1.pt")["paths"] == [None, None, None]  # rank 0 writes
    assert record["paths"] == [str(out / n) for n in ("model.safetensors", "model.pt", "export.safetensors")]
    full = record["full"]
    assert full.keys() == weights(stack_trainer()).keys()
    for written in (load_file(str(out / "model.safetensors")), torch.load(out / "model.pt", weights_only=True),
                    load_file(str(out / "export.safetensors"))):
        assert written.keys() == full.keys()
        for name, value in full.items():
            assert type(written[name]) is torch.Tensor and torch.equal(written[name], value), name


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_apply_weights_and_test_best_on_a_sharded_model_match_one_process(extras: dict[str, Any]) -> None:
    from fsdp_scripts.extras import ONE_CKPT, TEST_LOADER

    out = extras["out"]
    ranks = [_load(out / f"best-{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["sharded"].startswith("FSDP")  # fully_shard really wrapped the model
    folder = out / "offload"  # written by the 2 ranks with save_format="dcp"
    alone = stack_trainer(StateManagerAddon, save_path=str(folder))  # one process, the same sources
    best = json.loads((folder / "manifest.json").read_text())["best"]
    sources = {"best": ("best", read_weights(str(folder / best))),  # a dcp folder, named "best"
               "ckpt": (str(out / ONE_CKPT), read_weights(str(out / ONE_CKPT)))}  # a one-process ckpt file
    for name, (source, expected) in sources.items():
        metrics = alone.test(stack_loader(**TEST_LOADER), weights=source)
        for rank in ranks:  # test() on 2 ranks evaluated these weights, like one process
            assert rank["tested"][name].keys() == metrics.keys()
            for key, value in metrics.items():
                assert rank["tested"][name][key] == pytest.approx(value, rel=1e-6), (name, key)
        alone.apply_weights(source)
        loaded = ranks[0]["loaded"][name]  # gathered from both ranks' shards after apply_weights
        assert loaded.keys() == expected.keys() == weights(alone).keys()
        for key, value in expected.items():
            assert torch.equal(loaded[key], value) and torch.equal(weights(alone)[key], value), (name, key)
    # test(weights=...) put the trained weights back, though the ckpt weights differ from them.
    before = ranks[0]["before"]
    assert any(not torch.equal(before[k], v) for k, v in sources["ckpt"][1].items())
    assert all(torch.equal(ranks[0]["after_test"][k], v) for k, v in before.items())
    for rank in ranks:  # weights of another model: the clear error on every rank, before any collective
        assert "was saved from a different model" in rank["mismatch"] and "To fix" in rank["mismatch"]


# ======================================================================================
# SIGTERM to every rank; an exception on one
# ======================================================================================
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_to_both_ranks_writes_an_emergency_dcp_checkpoint(extras: dict[str, Any]) -> None:
    out = extras["out"]
    ranks = [_load(out / f"term-{rank}.pt") for rank in (0, 1)]
    assert [r["code"] for r in ranks] == [128 + 15] * 2 and [r["status"] for r in ranks] == ["interrupted"] * 2
    step = ranks[0]["step"]
    assert ranks[1]["step"] == step and 5 <= step <= 8  # stopped together, within epoch 2
    assert not [w for r in ranks for w in r["warnings"] if "no emergency checkpoint" in w]

    folder = out / "term"
    manifest = json.loads((folder / "manifest.json").read_text())
    emergency = manifest["checkpoints"][-1]
    assert emergency["reasons"] == ["interrupt"] and emergency["step"] == step and manifest["latest"] == emergency["name"]
    assert emergency["name"].endswith("-interrupt") and ranks[0]["latest"] == emergency["name"]
    alone, path = _read_alone(folder)
    assert path == str(folder / emergency["name"]) and alone.progress_checker.step == step
    for name, value in ranks[0]["full"].items():
        assert torch.equal(weights(alone)[name], value), name
    for rank in (0, 1):  # resumed from it on 2 ranks, to the end
        again = _load(out / f"term-again-{rank}.pt")
        assert again == {"step": 16, "status": "finished"}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_exception_on_one_rank_skips_the_emergency_save_with_one_warning(extras: dict[str, Any]) -> None:
    out = extras["out"]
    assert extras["codes"] == [0, 3], (extras["codes"], _errors(out))  # both ended, none hung
    failing = _load(out / "crash-1.pt")
    assert failing["error"].startswith("ValueError: boom on rank 1")
    refusals = [w for w in failing["warnings"] if w.startswith("no emergency checkpoint (exception)")]
    assert len(refusals) == 1 and "every rank together" in refusals[0] and "resume='latest'" in refusals[0]
    assert _load(out / "crash-0.pt")["error"]  # the other rank failed too (its peer left), promptly

    folder = out / "crash"
    assert _listed(folder) == ["epoch0001-step0000002"]
    assert not [p for p in folder.iterdir() if ".zt-tmp-" in p.name]  # no save was even begun
    alone, path = _read_alone(folder)
    assert path == str(folder / "epoch0001-step0000002") and alone.progress_checker.step == 2


# ======================================================================================
# In one process
# ======================================================================================
def test_fsdp_is_a_builtin_named_fsdp() -> None:
    from fsdp_helpers import StackTrainer
    from zae_trainer import registry
    from zae_trainer.addons.distributed.fsdp import FSDPAddon

    assert registry.resolve("fsdp") is FSDPAddon and registry.resolve("FSDP") is FSDPAddon
    assert list(StackTrainer.add_on("fsdp").addons) == [FSDPAddon]


def test_when_several_ranks_can_write_an_emergency_dcp_checkpoint() -> None:
    from zae_trainer.addons.checkpoint.dcp_format import _no_emergency_save_because
    from zae_trainer.addons.distributed.fsdp import FSDPAddon

    sharded, plain = stack_trainer(FSDPAddon), stack_trainer()
    assert _no_emergency_save_because(sharded, "interrupt") is None  # its ranks agree on the batch to stop at
    assert "no strategy that makes them agree" in str(_no_emergency_save_because(plain, "interrupt"))
    for trainer in (sharded, plain):  # an exception is one rank's own: never
        assert "every rank together" in str(_no_emergency_save_because(trainer, "exception"))
