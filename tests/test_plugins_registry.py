"""Discovery of add-ons by name: built-ins, entry points, clashes, listing."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from zae_trainer import AddOn, Trainer
from zae_trainer import registry
from zae_trainer.addons import available


@pytest.fixture()
def fresh_registry():
    registry.entries.cache_clear()
    yield
    registry.entries.cache_clear()


def _fake_distribution(root: Path, dist: str, module: str, entry_name: str, body: str) -> None:
    """A real installed-distribution layout (dist-info with entry_points.txt) on a tmp path."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[zae_trainer.addons]\n{entry_name} = {module}:Plugin\n")


_PLUGIN = """
from zae_trainer import AddOn
class Plugin(AddOn):
    name = "{name}"
    def __init__(self, *, level: int = 1):
        self.level = level
"""


def test_builtin_is_found_by_name_case_and_dash_insensitively() -> None:
    from zae_trainer.addons.state_manager import StateManagerAddon

    assert registry.resolve("state_manager") is StateManagerAddon
    assert registry.resolve("State-Manager") is StateManagerAddon


def test_installed_plugin_is_found_and_usable_by_name(tmp_path: Path, monkeypatch, fresh_registry) -> None:
    _fake_distribution(tmp_path, "zt-plugin-one", "zt_plugin_one", "one", _PLUGIN.format(name="PluginOne"))
    monkeypatch.syspath_prepend(str(tmp_path))
    built = Trainer.add_on("one")
    assert [a.name for a in built.addons] == ["PluginOne"]
    listing = available()["one"]
    assert listing["distribution"] == "zt-plugin-one" and listing["settings"] == {"level": 1}


def test_two_distributions_claiming_one_name_is_an_error_naming_both(tmp_path: Path, monkeypatch, fresh_registry) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    _fake_distribution(first, "zt-plugin-a", "zt_plugin_a", "clash", _PLUGIN.format(name="A"))
    _fake_distribution(second, "zt-plugin-b", "zt_plugin_b", "clash", _PLUGIN.format(name="B"))
    monkeypatch.syspath_prepend(str(first))
    monkeypatch.syspath_prepend(str(second))
    with pytest.raises(RuntimeError) as info:
        Trainer.add_on("clash")
    message = str(info.value)
    assert "zt-plugin-a" in message and "zt-plugin-b" in message and "'clash'" in message


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(KeyError, match="(?i)did you mean 'state_manager'"):
        Trainer.add_on("state_manger")


def test_available_lists_builtins_with_settings() -> None:
    listing = available()
    assert listing["state_manager"]["importable"] is True
    assert listing["state_manager"]["settings"]["save_path"] == "<required>"
    assert listing["state_manager"]["distribution"] == "zae_trainer"


def test_broken_plugin_is_listed_not_fatal(tmp_path: Path, monkeypatch, fresh_registry) -> None:
    _fake_distribution(tmp_path, "zt-broken", "zt_broken", "broken", "raise ImportError('missing dependency xyz')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    listing = available()["broken"]
    assert listing["importable"] is False and "missing dependency xyz" in listing["error"]


def test_builtin_addons_pass_the_conformance_suite(tmp_path: Path) -> None:
    from zae_trainer.testing import BUILTIN_FACTORIES, check_addon, usable_builtins

    checked = []
    for name, cls in usable_builtins().items():
        folder = tmp_path / name
        folder.mkdir()
        settings = BUILTIN_FACTORIES[name](folder)
        check_addon(cls, settings, workdir=folder, skip=("compose",))
        checked.append(name)
    assert "state_manager" in checked


def test_a_plugin_from_the_addons_folder_is_used_by_name() -> None:
    pytest.importorskip("zae_trainer_ema", reason="install addons/zae-trainer-ema (the README test command does)")
    built = Trainer.add_on("ema")
    assert built.addons[0].__name__ == "EMAAddon"


@pytest.mark.parametrize("reference", ["state_manager", "StateManagerAddon", "State-Manager"])
def test_ordering_and_conflicts_accept_registered_names_and_class_names(reference: str, tmp_path: Path) -> None:
    from zae_trainer.addons.state_manager import StateManagerAddon
    from zae_trainer.errors import AddOnDefinitionError
    from core_helpers import TinyTrainer, tiny_trainer

    class First(AddOn):
        runs_before = (reference,)

        def on_run_begin(self, trainer) -> None:
            pass

    cls = TinyTrainer.add_on(StateManagerAddon, First)
    trainer = tiny_trainer(cls, save_path=str(tmp_path))
    # StateManagerAddon's order (-100) alone would put it first; the declaration wins
    assert [a.name for a in trainer.addon_instances] == ["First", "state_manager"]

    class Clash(AddOn):
        conflicts_with = (reference,)

    with pytest.raises(AddOnDefinitionError, match="'Clash' declares a conflict with 'state_manager'"):
        TinyTrainer.add_on(Clash, StateManagerAddon)
