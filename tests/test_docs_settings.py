"""Settings tables in the docs come from the code, and every built-in add-on has one.

The docs never write a settings table by hand: a page holds a marker
``<!-- settings: module:Class -->`` and ``docs/_hooks/settings_tables.py`` renders the table
from ``inspect.signature`` (names, defaults) and the class docstring's ``Parameters`` section
(meanings). These tests check, without building the site, that

* every marker names a class that exists;
* each constructor parameter is described in the docstring, and the docstring describes no
  parameter the constructor lacks (a renamed setting fails here);
* the rendered rows are exactly the signature's names and defaults, in order;
* every built-in add-on, and the trainer itself, has a table somewhere in the docs.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

from zae_trainer.registry import BUILTIN_ADDONS

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("settings_tables", ROOT / "docs" / "_hooks" / "settings_tables.py")
assert _spec is not None and _spec.loader is not None
settings_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(settings_tables)


def _documented_targets() -> dict[str, list[str]]:
    """``{target: [pages that show its table]}`` over every Markdown page of the site."""
    found: dict[str, list[str]] = {}
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for target in settings_tables.targets_in(page.read_text()):
            found.setdefault(target, []).append(str(page.relative_to(ROOT)))
    return found


TARGETS = sorted(_documented_targets())


def test_every_builtin_addon_and_the_trainer_have_a_settings_table() -> None:
    documented = set(_documented_targets())
    wanted = {"zae_trainer.trainer:Trainer", *BUILTIN_ADDONS.values()}
    missing = sorted(wanted - documented)
    assert not missing, f"no <!-- settings: ... --> table in docs/ for {missing}"


@pytest.mark.parametrize("target", TARGETS)
def test_settings_table_matches_the_signature_and_the_docstring(target: str) -> None:
    assert settings_tables.problems(target) == []
    cls = settings_tables.load(target)
    rows = settings_tables.table(target).splitlines()[2:]
    cells = [row.strip().strip("|").split(" | ") for row in rows]
    shown = [(c[0].strip().strip("`"), c[1].strip()) for c in cells]
    params = [p for p in list(inspect.signature(cls.__init__).parameters.values())[1:] if p.kind is not p.VAR_POSITIONAL]
    expected = [
        (
            f"**{p.name}" if p.kind is p.VAR_KEYWORD else p.name,
            "" if p.kind is p.VAR_KEYWORD else ("required" if p.default is p.empty else f"`{p.default!r}`"),
        )
        for p in params
    ]
    assert [name for name, _ in shown] == [name for name, _ in expected]
    assert [default for _, default in shown] == [default for _, default in expected]


def test_a_stale_docstring_is_reported() -> None:
    """The check can fail: a docstring that describes a renamed setting and misses the new one."""

    class Stale:
        """Parameters
        ----------
        old_name : int
            Renamed since.
        """

        def __init__(self, *, new_name: int = 1) -> None:
            self.new_name = new_name

    import sys
    import types

    module = types.ModuleType("zae_docs_stale_demo")
    module.Stale = Stale  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        problems = settings_tables.problems("zae_docs_stale_demo:Stale")
    finally:
        del sys.modules[module.__name__]
    assert any("'new_name' has no description" in p for p in problems), problems
    assert any("describes 'old_name'" in p for p in problems), problems
