"""FSDPAddon and save_format="dcp": real gloo processes on the CPU.

Starting processes is the slow part on a small machine, so one pair of processes (the
"existing process group" launch mode, :mod:`fsdp_scripts.scenarios`) runs every distributed
scenario once, and the tests below each check one property of what it left behind:

* 4 epochs with FSDP on 2 ranks (Adam, shuffling, accumulation of 2, clipping by the global
  norm) against one process with twice the batch;
* 2 epochs saved with dcp, resumed on 2 ranks to epoch 4: bit-identical to the 4 epochs;
* the 2-rank checkpoint loaded (and exported) by one process;
* a third run whose rank 1 is SIGKILLed inside its second dcp save.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ddp_helpers import SetEpoch, fast_start_method
from fsdp_helpers import Block, StackTrainer, TinyStack, stack_data, stack_loader, stack_trainer, weights
from zae_trainer import TrainerConfigError
from zae_trainer.addons.checkpoint.formats import read_weights
from zae_trainer.addons.clipping import GradientClippingAddon
from zae_trainer.addons.distributed.fsdp import FSDPAddon, default_shard_policy
from zae_trainer.addons.multi_gpu import MultiGPUAddon
from zae_trainer.addons.state_manager import StateManagerAddon
from zae_trainer.errors import AddOnDefinitionError

# Parameters of 2 FSDP ranks and of one process at double batch differ only by the order of
# float32 additions (a reduce-scatter sums the two halves of each gradient); measured here:
# at most ~1e-7 after 16 Adam steps.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fsdp_scripts.scenarios import launch

    out = tmp_path_factory.mktemp("fsdp")
    codes = launch("resume_then_kill", str(out), timeout=30.0, deadline=300.0)
    return {"out": out, "codes": codes}


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=False)  # written by our own workers a moment ago


def _errors(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(out.glob("error-*.txt")))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_fsdp_ranks_match_one_process_with_double_batch(scenario: dict[str, Any]) -> None:
    out = scenario["out"]
    assert (out / "whole-0.pt").exists(), _errors(out)
    sharded = _load(out / "whole-0.pt")
    assert sharded["model_type"] == "FSDPTinyStack"  # fully_shard did shard the model in place

    data = stack_data(32)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=1)  # the loader's seed
    reference = stack_trainer(SetEpoch, GradientClippingAddon, accumulate_grad_batches=2, max_norm=0.05)
    reference.run(4, DataLoader(data, batch_size=4, sampler=sampler), stack_loader(8, 4, seed=5))

    full = sharded["full"]
    for name, value in weights(reference).items():
        torch.testing.assert_close(full[name], value, rtol=RTOL, atol=ATOL, msg=name)
    # Clipping by the global norm: the norm the sharded run measured (over both ranks' shards)
    # is the one-process norm; a per-shard norm would be about 1/sqrt(2) of it, and the
    # clipped updates (max_norm far below the norm) would differ.
    assert sharded["metrics"]["train/grad_norm"] == pytest.approx(reference.epoch_metrics["train/grad_norm"], rel=1e-5)
    assert reference.epoch_metrics["train/grad_norm"] > 10 * 0.05
    for name in ("train/loss", "valid/loss"):
        assert sharded["metrics"][name] == pytest.approx(reference.epoch_metrics[name], rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_with_two_ranks_is_bit_identical(scenario: dict[str, Any]) -> None:
    out = scenario["out"]
    for rank in (0, 1):
        assert (out / f"resumed-{rank}.pt").exists(), _errors(out)
        whole, resumed = _load(out / f"whole-{rank}.pt"), _load(out / f"resumed-{rank}.pt")
        assert resumed["local"]["step"] == whole["local"]["step"] == 16
        for name, shard in whole["local"]["params"].items():
            assert torch.equal(resumed["local"]["params"][name], shard), (rank, name)
        assert whole["local"]["optimizer"].keys() == resumed["local"]["optimizer"].keys()
        for index, state in whole["local"]["optimizer"].items():
            for key, value in state.items():
                assert torch.equal(resumed["local"]["optimizer"][index][key], value), (rank, index, key)
        assert resumed["metrics"] == whole["metrics"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_checkpoint_of_two_ranks_loads_and_exports_in_one_process(scenario: dict[str, Any], tmp_path: Path) -> None:
    out = scenario["out"]
    first = _load(out / "first.pt")
    folder = out / "ckpt" / "epoch0002-step0000008"
    assert (folder / ".metadata").exists() and (folder / "__1_0.distcp").exists()  # both ranks wrote shards

    alone = stack_trainer(StateManagerAddon, save_path=str(tmp_path / "elsewhere"))
    with pytest.warns(RuntimeWarning, match="written by 2 process"):
        alone.load_state(str(folder))
    for name, value in first["full"].items():
        assert torch.equal(weights(alone)[name], value), name
    # Adam's state, resharded to one process, equals the state gathered from the two ranks.
    gathered = first["gathered"]["optimizer"]
    own = alone.optimizer.state_dict()
    assert own["param_groups"] == gathered["param_groups"]
    for index, state in gathered["state"].items():
        for key, value in state.items():
            assert torch.equal(own["state"][index][key], value), (index, key)
    assert alone.progress_checker.step == 8 and alone.progress_checker.epoch == 2

    # Weights for serving: from the running FSDP ranks (gathered) and from the folder (no model).
    from safetensors.torch import load_file

    served = load_file(str(out / "first.safetensors"))
    assert served.keys() == first["full"].keys()
    assert all(torch.equal(served[k], v) for k, v in first["full"].items())
    exported = alone.export_weights(str(tmp_path / "w.safetensors"), source=str(folder))
    assert exported is not None
    assert all(torch.equal(load_file(exported)[k], v) for k, v in first["full"].items())
    assert all(torch.equal(read_weights(str(folder))[k], v) for k, v in first["full"].items())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_of_a_rank_during_a_dcp_save_leaves_the_previous_checkpoint(scenario: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    out = scenario["out"]
    assert scenario["codes"] == [1, -9], (scenario["codes"], _errors(out))  # rank 1 killed; rank 0 failed, no hang
    folder = out / "killed"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [c["name"] for c in manifest["checkpoints"]] == ["epoch0001-step0000002"]
    leftovers = [p.name for p in folder.iterdir() if ".zt-tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(".epoch0002")  # the half-written one, never listed

    alone = stack_trainer(StateManagerAddon, save_path=str(folder))  # setup clears a dead writer's temp folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # written by 2, loaded by 1
        assert alone.load_state("latest") == str(folder / "epoch0001-step0000002")
    assert alone.progress_checker.step == 2
    assert not [p for p in folder.iterdir() if ".zt-tmp-" in p.name]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_spawned_fsdp_run_hands_the_full_state_back(tmp_path: Path) -> None:
    trainer = stack_trainer(FSDPAddon, world_size=2, accumulate_grad_batches=2, collective_timeout=60.0,
                            start_method=fast_start_method())
    trainer.run(1, stack_loader(16, 2))
    reference = stack_trainer(accumulate_grad_batches=2)
    reference.run(1, stack_loader(16, 4))

    assert not hasattr(trainer.model, "reshard")  # the caller's model was never sharded
    for name, value in weights(reference).items():
        torch.testing.assert_close(weights(trainer)[name], value, rtol=RTOL, atol=ATOL, msg=name)
    own, ref = trainer.optimizer.state_dict(), reference.optimizer.state_dict()
    for index, state in ref["state"].items():
        torch.testing.assert_close(own["state"][index]["exp_avg"], state["exp_avg"], rtol=RTOL, atol=ATOL)
    assert trainer.progress_checker.step == reference.progress_checker.step == 2


# ======================================================================================
# In one process
# ======================================================================================
def test_dcp_checkpoint_in_one_process_resumes_exactly(tmp_path: Path) -> None:
    whole = stack_trainer()
    whole.run(3, stack_loader(16, 4, shuffle=True))

    first = stack_trainer(StateManagerAddon, save_path=str(tmp_path), save_format="dcp")
    first.run(2, stack_loader(16, 4, shuffle=True))
    names = json.loads((tmp_path / "manifest.json").read_text())["checkpoints"]
    assert [c["name"] for c in names] == ["epoch0001-step0000004", "epoch0002-step0000008"]
    resumed = stack_trainer(StateManagerAddon, save_path=str(tmp_path), save_format="dcp", resume="latest")
    resumed.run(3, stack_loader(16, 4, shuffle=True))

    assert all(torch.equal(a, b) for a, b in zip(weights(whole).values(), weights(resumed).values()))
    assert resumed.history == whole.history


def test_default_policy_shards_transformer_blocks() -> None:
    model = nn.Sequential(TinyStack(), nn.TransformerEncoderLayer(8, 2, 16))
    chosen = default_shard_policy(model)
    assert [type(m).__name__ for m in chosen] == ["Block", "Block", "TransformerEncoderLayer"]
    assert default_shard_policy(nn.Linear(2, 2)) == []  # no blocks: the root alone is sharded


def test_policy_by_class_or_function_and_bad_policies() -> None:
    model = TinyStack()
    assert FSDPAddon(shard_policy=[Block])._targets(model) == list(model.blocks)
    assert FSDPAddon(shard_policy=_is_head)._targets(model) == [model.head]
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        FSDPAddon(shard_policy=[int])
    with pytest.raises(TypeError, match="MixedPrecisionPolicy"):
        FSDPAddon(mixed_precision=torch.bfloat16)


def _is_head(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module.out_features == 1


def test_configurations_that_cannot_work_are_refused_before_any_process_starts(tmp_path: Path) -> None:
    with pytest.raises(TrainerConfigError, match="save_format='dcp'"):
        stack_trainer(FSDPAddon, StateManagerAddon, world_size=2, save_path=str(tmp_path), save_format="ckpt")
    with pytest.raises(TrainerConfigError, match="save_every_n_epochs"):
        stack_trainer(FSDPAddon, StateManagerAddon, world_size=2, save_path=str(tmp_path), save_format="dcp",
                      save_every_n_steps=2)
    with pytest.raises(AddOnDefinitionError, match="conflict"):
        StackTrainer.add_on(FSDPAddon, MultiGPUAddon)


def test_conformance_in_one_process(tmp_path: Path) -> None:
    from zae_trainer.testing import check_addon

    report = check_addon(FSDPAddon, workdir=tmp_path)
    assert report["sync"] == 0 and report["pickle"] == "ok"
    assert report["state"] == ["ckpt", "safetensors"]
