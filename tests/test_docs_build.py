"""The documentation site builds with ``mkdocs build --strict``, and the strict build catches rot.

Strict mode turns every warning into a failure: a broken link or anchor between pages, a page
missing from the navigation, a docstring that names a symbol which no longer exists (the
``docs/_hooks/sphinx_roles.py`` griffe extension checks every Sphinx role in the package's
docstrings), and a settings table whose class or docstring disagrees with the code
(``docs/_hooks/settings_tables.py``). The second test proves those checks can fail, on a
throw-away site with one defect of each kind.

Needs the ``docs`` extra (``pip install -e ".[docs]"``). Without it the tests are skipped,
except in CI (``CI`` set in the environment), which installs the extra and must build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # in CI the docs extra is installed, and a missing one must fail
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "docs" / "_hooks"


def _mkdocs_build(config: Path, site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    pythonpath = os.pathsep.join(p for p in (str(cwd), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": pythonpath}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_site_builds_strictly(tmp_path: Path) -> None:
    result = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site", ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (tmp_path / "site" / "reference" / "trainer" / "index.html").read_text()
    assert 'id="zae_trainer.trainer.Trainer"' in reference  # the API reference was generated
    assert not list(ROOT.glob("site")), "the build must not write into the repository"


def test_strict_build_fails_on_a_renamed_symbol_a_broken_link_and_a_stale_settings_table(tmp_path: Path) -> None:
    """One throw-away site with three defects; each must be reported, and the build must fail."""
    package = tmp_path / "demo_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            '''
            """Demo package."""


            class Widget:
                """A widget; see :class:`Gadget`, which was renamed.

                Parameters
                ----------
                size : int
                    How big.
                colour : str
                    A setting the constructor no longer takes.
                """

                def __init__(self, size: int = 1) -> None:
                    self.size = size
            '''
        )
    )
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(
        "# Demo\n\nSee [the guide](guide.md).\n\n<!-- settings: demo_pkg:Widget -->\n\n::: demo_pkg.Widget\n"
    )
    (tmp_path / "mkdocs.yml").write_text(
        textwrap.dedent(
            f"""
            site_name: demo
            docs_dir: docs
            hooks: ["{HOOKS / 'settings_tables.py'}"]
            plugins:
              - autorefs
              - mkdocstrings:
                  handlers:
                    python:
                      paths: ["."]
                      options:
                        docstring_style: numpy
                        extensions:
                          - "{HOOKS / 'sphinx_roles.py'}:SphinxRoles":
                              package: demo_pkg
            """
        )
    )
    result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site", tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "guide.md" in output  # the broken link
    assert ":class:`Gadget`" in output  # the renamed symbol, named with the object that uses it
    assert "demo_pkg.Widget" in output
    assert "'colour'" in output  # the settings table's stale parameter
