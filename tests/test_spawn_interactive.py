"""Multi-process training from a notebook: refused before any process starts when the workers
could not import the user's classes, with what to do instead; allowed when they can."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from zae_trainer.addons.distributed import spawn
from zae_trainer.addons.multi_gpu import MultiGPUAddon
from zae_trainer.errors import TrainerConfigError
from zae_trainer.testing import TinyRegressionTrainer, tiny_loader, tiny_trainer


class Started(Exception):
    """Raised instead of starting worker processes."""


@pytest.fixture
def notebook_main(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """``__main__`` as Jupyter and ``python -c`` have it: a module without ``__file__``."""
    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)

    def no_processes(*args: Any, **kwargs: Any) -> None:
        raise Started

    monkeypatch.setattr(spawn.mp, "start_processes", no_processes)
    return main


def _defined_in(main: types.ModuleType) -> type:
    class NotebookTrainer(TinyRegressionTrainer):
        pass

    NotebookTrainer.__module__ = "__main__"
    NotebookTrainer.__qualname__ = "NotebookTrainer"
    main.NotebookTrainer = NotebookTrainer  # type: ignore[attr-defined]
    return NotebookTrainer


def test_classes_defined_in_a_notebook_are_refused_before_any_process_starts(notebook_main: types.ModuleType) -> None:
    trainer = tiny_trainer(_defined_in(notebook_main).add_on(MultiGPUAddon), world_size=2)
    with pytest.raises(TrainerConfigError) as info:
        trainer.run(1, tiny_loader())
    message = str(info.value)
    assert "cannot start 2 worker processes from this notebook" in message
    assert "NotebookTrainer" in message and "defined in it" in message and "Nothing was started" in message
    assert "torchrun --nproc-per-node=N" in message and ".py module" in message


def test_a_notebook_that_imports_its_classes_may_spawn(notebook_main: types.ModuleType) -> None:
    trainer = tiny_trainer(TinyRegressionTrainer.add_on(MultiGPUAddon), world_size=2)
    with pytest.raises(Started):  # got past the check to the point of starting processes
        trainer.run(1, tiny_loader())


def test_a_script_main_is_not_checked(monkeypatch: pytest.MonkeyPatch, notebook_main: types.ModuleType) -> None:
    cls = _defined_in(notebook_main)
    monkeypatch.setattr(notebook_main, "__file__", "/tmp/train.py", raising=False)
    trainer = tiny_trainer(cls.add_on(MultiGPUAddon), world_size=2)
    with pytest.raises(Started):  # workers re-import the script, so its classes are found
        trainer.run(1, tiny_loader())
