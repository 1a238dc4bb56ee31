"""Which checkpoints are kept: one "best" rule on ties, several monitors, periodic saves,
names from a template, fixed ``best``/``last`` links, and deletions that survive an exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

from zae_trainer.addons import StateManagerAddon
from zae_trainer.addons.checkpoint import read_checkpoint
from zae_trainer.addons.checkpoint.manifest import Entry, Manifest
from zae_trainer.testing import TinyRegressionTrainer, tiny_loader, tiny_trainer

ROOT = Path(__file__).resolve().parent.parent


class Scored(TinyRegressionTrainer):
    """Validation reports ``acc`` (and ``f1``) from a script per epoch: rankings become predictable."""

    acc: Sequence[float] = ()
    f1: Sequence[float] = ()

    def test_step(self, batch: Any) -> dict[str, Any]:
        out = super().test_step(batch)
        epoch = self.progress_checker.epoch
        out["acc"] = torch.tensor(self.acc[epoch])
        if self.f1:
            out["f1"] = torch.tensor(self.f1[epoch])
        return out


def run(folder: Path, acc: Sequence[float], f1: Sequence[float] = (), *, monitor: str = "valid/acc",
        monitor_mode: str = "max", **settings: Any) -> Any:
    cls = type("S", (Scored,), {"acc": list(acc), "f1": list(f1)})
    trainer = tiny_trainer(cls.add_on(StateManagerAddon), save_path=str(folder), monitor=monitor,
                           monitor_mode=monitor_mode, **settings)
    trainer.run(len(acc), tiny_loader(16), tiny_loader(8))
    return trainer


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def by_name(folder: Path) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in manifest(folder)["checkpoints"]}


def visible(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


# -- one rule for "best" ------------------------------------------------------------------
def test_tied_accuracies_name_the_same_best_epoch_everywhere(tmp_path: Path) -> None:
    # epochs 2, 4 and 5 tie at the best accuracy; the earliest (2) is best everywhere
    acc = [0.5, 0.875, 0.75, 0.875, 0.875, 0.625]
    trainer = run(tmp_path, acc, keep_top_k=1, keep_last=1)
    assert trainer.best["epoch"] == 2 and trainer.summary.best_epoch == 2
    m = manifest(tmp_path)
    entries = by_name(tmp_path)
    assert entries[m["best"]]["epoch"] == 2
    assert sorted(e["epoch"] for e in entries.values()) == [2, 6]  # the best kept, the tie-makers deleted
    assert os.readlink(tmp_path / "best.ckpt") == m["best"]
    best_weights = read_checkpoint(str(tmp_path / m["best"]))["model"]
    trainer.apply_weights("best")
    assert all(torch.equal(trainer.raw_model.state_dict()[k], v) for k, v in best_weights.items())
    resumed = tiny_trainer(type("S", (Scored,), {"acc": acc}).add_on(StateManagerAddon), save_path=str(tmp_path),
                           monitor="valid/acc", monitor_mode="max", resume="best")
    resumed.load_state("best")
    assert resumed.progress_checker.epoch == 2 and resumed.best["epoch"] == 2


def test_manifest_ranking_puts_the_earliest_of_equal_values_first(tmp_path: Path) -> None:
    m = Manifest(str(tmp_path), mode="max")
    for epoch, value in enumerate([0.5, 0.9, 0.9, 0.7], start=1):
        m.add(Entry(name=f"e{epoch}", epoch=epoch, step=epoch, batch_in_epoch=0, reasons=["last"], value=value))
    assert [e.name for e in m.ranked()] == ["e2", "e3", "e4", "e1"]
    assert not m.would_rank(0.9, top_k=1) and m.would_rank(0.91, top_k=1)  # a tie does not displace
    assert [e.name for e in m.retain(keep_last=1, top_k=1)] == ["e1", "e3"]


# -- several monitors ---------------------------------------------------------------------
def test_each_monitor_keeps_its_own_top_k_and_shares_files(tmp_path: Path) -> None:
    # best by valid/loss (the trainer's monitor) top-2, and separately by valid/acc and valid/f1 top-1
    acc = [0.5, 0.875, 0.625, 0.75, 0.625]
    f1 = [0.25, 0.875, 0.5, 0.5, 0.375]  # same pick as acc: epoch 2, one file
    trainer = run(tmp_path, acc, f1, monitor="valid/loss", monitor_mode="min", keep_top_k=2, keep_last=1,
                  monitors={"valid/acc": ("max", 1), "valid/f1": {"mode": "max", "top_k": 1}})
    entries = by_name(tmp_path)
    losses = {e["epoch"]: e["metrics"]["valid/loss"] for e in entries.values()}
    best_loss_epochs = sorted(sorted(range(1, 6), key=lambda ep: trainer.history[ep - 1]["valid/loss"])[:2])
    kept = sorted(e["epoch"] for e in entries.values())
    assert kept == sorted({*best_loss_epochs, 2, 5})  # top-2 by loss, epoch 2 for acc and f1, the latest
    assert len(kept) == len(set(kept))  # one file per epoch, however many criteria chose it
    m = manifest(tmp_path)
    assert entries[m["best_by"]["valid/acc"]]["epoch"] == 2 and m["best_by"]["valid/f1"] == m["best_by"]["valid/acc"]
    assert entries[m["best"]]["epoch"] == min(losses, key=lambda ep: (losses[ep], ep)) == trainer.best["epoch"]
    assert os.readlink(tmp_path / "best-valid_acc.ckpt") == m["best_by"]["valid/acc"]
    assert visible(tmp_path) == sorted([*entries, "best-valid_acc.ckpt", "best-valid_f1.ckpt", "best.ckpt",
                                        "last.ckpt", "manifest.json"])
    acc_weights = read_checkpoint(str(tmp_path / m["best_by"]["valid/acc"]))["model"]
    trainer.apply_weights("best:valid/acc")
    assert torch.equal(trainer.raw_model.weight, acc_weights["weight"])


def test_monitor_settings_fail_at_construction_and_a_missing_metric_names_the_others(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        StateManagerAddon(save_path=str(tmp_path), monitors={"valid/acc": ("up", 1)})
    with pytest.raises(ValueError, match="phase/name"):
        StateManagerAddon(save_path=str(tmp_path), monitors={"acc": ("max", 1)})
    with pytest.raises(Exception, match=r"'valid/accuracy'.*'valid/acc'"):
        run(tmp_path, [0.5], monitors={"valid/accuracy": ("max", 1)})


# -- periodic checkpoints, names, links ------------------------------------------------------
def test_periodic_checkpoints_are_kept_by_their_own_rule(tmp_path: Path) -> None:
    acc = [0.5] * 7
    run(tmp_path / "all", acc, keep_top_k=0, keep_last=1, save_every_n_epochs=2)
    assert sorted(e["epoch"] for e in by_name(tmp_path / "all").values()) == [2, 4, 6, 7]
    run(tmp_path / "two", acc, keep_top_k=0, keep_last=1, save_every_n_epochs=2, keep_periodic=2)
    assert sorted(e["epoch"] for e in by_name(tmp_path / "two").values()) == [4, 6, 7]


def test_file_name_template_with_prefix(tmp_path: Path) -> None:
    run(tmp_path, [0.5, 0.75], save_format="safetensors", filename="e{epoch:02d}_s{step}", filename_prefix="mlp-",
        keep_last=5)
    assert sorted(by_name(tmp_path)) == ["mlp-e01_s2", "mlp-e02_s4"]
    assert os.readlink(tmp_path / "last") == "mlp-e02_s4" and os.readlink(tmp_path / "best") == "mlp-e02_s4"
    assert read_checkpoint(str(tmp_path / "last"))["progress"]["epoch"] == 2  # a fixed path any script can read
    with pytest.raises(ValueError, match=r"fields \['batch', 'epoch', 'reason', 'step'\]"):
        StateManagerAddon(save_path=str(tmp_path), filename="{epochs}")
    with pytest.raises(ValueError, match="not usable as a checkpoint name"):
        StateManagerAddon(save_path=str(tmp_path), filename="sub/{epoch}")


def test_links_are_repaired_when_the_next_trainer_opens_the_folder(tmp_path: Path) -> None:
    run(tmp_path, [0.5, 0.75], keep_last=5)
    os.remove(tmp_path / "best.ckpt")
    os.symlink("gone.ckpt", tmp_path / "last.ckpt.tmp")
    os.replace(tmp_path / "last.ckpt.tmp", tmp_path / "last.ckpt")  # as if a crash came between two updates
    tiny_trainer(TinyRegressionTrainer.add_on(StateManagerAddon), save_path=str(tmp_path), monitor="valid/acc",
                 monitor_mode="max")
    m = manifest(tmp_path)
    assert os.readlink(tmp_path / "best.ckpt") == m["best"] and os.readlink(tmp_path / "last.ckpt") == m["latest"]


def test_a_file_where_a_link_goes_is_refused_when_the_addon_starts(tmp_path: Path) -> None:
    """Another tool's regular ``last.ckpt`` is neither replaced nor found only after an epoch."""
    (tmp_path / "last.ckpt").write_bytes(b"someone else's checkpoint")
    with pytest.raises(Exception, match=r"last\.ckpt.* exists and is not a link.*link_best_last=False"):
        tiny_trainer(TinyRegressionTrainer.add_on(StateManagerAddon), save_path=str(tmp_path))
    assert (tmp_path / "last.ckpt").read_bytes() == b"someone else's checkpoint"
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(StateManagerAddon), save_path=str(tmp_path),
                           link_best_last=False)
    trainer.run(1, tiny_loader(16))
    assert (tmp_path / "last.ckpt").read_bytes() == b"someone else's checkpoint"
    assert manifest(tmp_path)["latest"] in os.listdir(tmp_path)


def test_links_follow_every_save_and_a_deleted_link_comes_back(tmp_path: Path) -> None:
    cls = type("S", (Scored,), {"acc": [0.5, 0.75, 0.625, 0.25]})
    trainer = tiny_trainer(cls.add_on(StateManagerAddon), save_path=str(tmp_path), monitor="valid/acc",
                           monitor_mode="max", keep_last=5)
    trainer.run(3, tiny_loader(16), tiny_loader(8))
    m = manifest(tmp_path)
    assert by_name(tmp_path)[m["best"]]["epoch"] == 2 and by_name(tmp_path)[m["latest"]]["epoch"] == 3
    assert os.readlink(tmp_path / "best.ckpt") == m["best"] and os.readlink(tmp_path / "last.ckpt") == m["latest"]
    os.remove(tmp_path / "last.ckpt")
    trainer.run(1, tiny_loader(16), tiny_loader(8))
    m = manifest(tmp_path)
    assert os.readlink(tmp_path / "last.ckpt") == m["latest"] and by_name(tmp_path)[m["latest"]]["epoch"] == 4
    assert by_name(tmp_path)[m["best"]]["epoch"] == 2 and os.readlink(tmp_path / "best.ckpt") == m["best"]
    assert not [n for n in os.listdir(tmp_path) if ".zt-tmp-" in n]  # no temporary link left behind


# -- durable deletion -------------------------------------------------------------------------
EXIT_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from zae_trainer.addons import StateManagerAddon
from zae_trainer.testing import TinyRegressionTrainer, tiny_trainer
import torch

import time
import zae_trainer.addons.state_manager as sm

remove = sm.remove_path
sm.remove_path = lambda path: (time.sleep(0.5), remove(path))  # a slow disk: the deletion outlives the script
width = 256
trainer = tiny_trainer(TinyRegressionTrainer.add_on(StateManagerAddon), save_path={folder!r},
                       save_format={fmt!r}, keep_last=1, keep_top_k=0)
trainer.raw_model.register_buffer("ballast", torch.zeros(width, width))
first = trainer.save_state()
trainer.progress_checker.step += 1
second = trainer.save_state()
print(first, second)
"""  # the interpreter then exits normally, with the deletion of `first` perhaps still under way


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_dropped_checkpoint_is_gone_after_a_normal_exit(tmp_path: Path, fmt: str) -> None:
    folder = tmp_path / "ckpts"
    for attempt in range(1):
        script = EXIT_SCRIPT.format(root=str(ROOT), folder=str(folder / str(attempt)), fmt=fmt)
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        first, second = out.stdout.split()
        assert not os.path.lexists(first)
        names = os.listdir(folder / str(attempt))
        assert sorted(names) == sorted(["manifest.json", os.path.basename(second), f"last{'.ckpt' if fmt == 'ckpt' else ''}"])


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_a_marked_leftover_is_removed_by_the_next_trainer(tmp_path: Path, fmt: str) -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(StateManagerAddon), save_path=str(tmp_path),
                           save_format=fmt, keep_last=5)
    kept, dropped = trainer.save_state(), None
    trainer.progress_checker.step += 1
    dropped = trainer.save_state()
    trainer.wait_for_checkpoint()
    # a process killed after renaming `dropped` for deletion, before the manifest no longer named it
    marked = os.path.join(str(tmp_path), "." + os.path.basename(dropped) + ".deleting")
    os.rename(dropped, marked)
    tiny_trainer(TinyRegressionTrainer.add_on(StateManagerAddon), save_path=str(tmp_path), save_format=fmt)
    assert not os.path.lexists(marked)
    assert [e["name"] for e in manifest(tmp_path)["checkpoints"]] == [os.path.basename(kept)]
