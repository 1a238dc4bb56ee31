"""Run zae-engine's own trainer tests against ``zae_trainer.compat`` (nothing is vendored).

What it does, in a scratch folder (default: a new temporary directory):

1. exports ``tests/trainer/`` from a zae-engine git repository (``git archive``);
2. swaps the import prefix, ``zae_engine.trainer`` -> ``zae_trainer.compat``, and nothing else;
3. installs zae-engine itself with ``pip install --no-deps --target`` (unless ``--site`` names
   an existing one): the tests import its *other* modules (``zae_engine.models`` for
   ``resnet18`` / ``DummyModel``, ``zae_engine.schedulers`` for ``WarmUpScheduler``);
4. writes a ``conftest.py`` that makes ``zae_engine`` a namespace package (its ``__init__``
   imports every sub-package and their optional dependencies, and would import zae-engine's
   own trainer), stands in for ``transformers`` when it is not installed (imported by
   ``zae_engine.models`` for BERT, never used by these tests), and runs W&B and Neptune offline;
5. runs pytest there and prints the outcome of every test.

Usage::

    python tests/compat/run_zae_engine_suite.py --repo /path/to/zae-engine [--ref HEAD]
    python tests/compat/run_zae_engine_suite.py --repo https://github.com/zae-park/zae-engine.git

The expected outcome and the reason for each exception are in
``docs/guides/migrating-from-zae-engine.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PREFIX_FROM = "zae_engine.trainer"
PREFIX_TO = "zae_trainer.compat"

CONFTEST = '''\
"""Written by zae_trainer's tests/compat/run_zae_engine_suite.py: zae-engine's non-trainer
modules without its package __init__, an import-only stand-in for transformers, and offline
web loggers."""
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

SITE = {site!r}

_pkg = types.ModuleType("zae_engine")
_pkg.__path__ = [os.path.join(SITE, "zae_engine")]
sys.modules["zae_engine"] = _pkg

if importlib.util.find_spec("transformers") is None:
    class _ImportOnly(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "transformers" or name.startswith("transformers."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = types.ModuleType(spec.name)
            module.__path__ = []

            def missing(attr):
                if attr.startswith("__"):
                    raise AttributeError(attr)

                def refuse(*args, **kwargs):
                    raise ImportError("transformers is not installed (import-only stand-in)")
                return type(attr, (), {{"from_pretrained": staticmethod(refuse), "__init__": refuse}})

            module.__getattr__ = missing
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.append(_ImportOnly())

for key, value in {{"WANDB_MODE": "offline", "WANDB_SILENT": "true", "NEPTUNE_MODE": "offline"}}.items():
    os.environ.setdefault(key, value)
'''


def export_tests(repo: str, ref: str, dest: Path) -> None:
    if re.match(r"^(https?|git|ssh)://|^git@", repo):
        clone = dest / "_clone"
        subprocess.run(["git", "clone", "--depth", "1", repo, str(clone)], check=True)
        repo = str(clone)
    archive = subprocess.run(["git", "-C", repo, "archive", ref, "tests/trainer"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def swap_prefix(root: Path) -> int:
    changed = 0
    for path in root.rglob("*.py"):
        text = path.read_text()
        if PREFIX_FROM in text:
            path.write_text(text.replace(PREFIX_FROM, PREFIX_TO))
            changed += 1
    return changed


def install_zae_engine(site: Path, version: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), f"zae-engine=={version}"],
        check=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="zae-engine git repository (path, bare repo or URL)")
    parser.add_argument("--ref", default="HEAD", help="commit or tag to take tests/trainer from")
    parser.add_argument("--site", help="an existing --target folder holding zae_engine (skips pip)")
    parser.add_argument("--version", default="0.7.6", help="zae-engine version to pip install for its other modules")
    parser.add_argument("--workdir", help="scratch folder (default: a new temporary directory)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="zae_engine_suite_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    suite = work / "suite"
    suite.mkdir(exist_ok=True)
    export_tests(args.repo, args.ref, suite)
    changed = swap_prefix(suite / "tests")
    site = Path(args.site).resolve() if args.site else work / "site"
    if not args.site:
        install_zae_engine(site, args.version)
    (suite / "conftest.py").write_text(CONFTEST.format(site=str(site)))
    # zae-engine's tests write relative to the working directory (test_saves/, ../wandb)
    cwd = Path(tempfile.mkdtemp(prefix="cwd_", dir=work)) / "inner"  # fresh: the tests mkdir ../wandb
    cwd.mkdir()
    print(f"suite: {suite / 'tests' / 'trainer'} ({changed} files with the prefix swapped); zae_engine from {site}")
    command = [sys.executable, "-m", "pytest", str(suite / "tests" / "trainer"), "-rA", "-p", "no:cacheprovider",
               f"--rootdir={suite}", *args.pytest_args]
    env = {**os.environ, "WANDB_DIR": str(work), "NEPTUNE_DATA_DIRECTORY": str(work / "neptune")}
    return subprocess.run(command, cwd=cwd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
