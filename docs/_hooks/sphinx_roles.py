"""Griffe extension: turn Sphinx roles in docstrings into checked cross-references.

The package's docstrings are numpy-style and name other objects with Sphinx roles
(``:class:`~zae_trainer.events.Event```, ``:meth:`inference```). mkdocstrings does not read
those roles, so left alone they render as literal text and a reference to a renamed or
removed symbol goes unnoticed. This extension rewrites each role, once the package is loaded:

* a name inside ``zae_trainer`` (written in full, relative like ``.schema``, or resolved
  from the docstring's scope: the object's members, its parents' members and its module's
  imports) must name an object that exists in the package, else a warning fails
  ``mkdocs build --strict``; it becomes a link where the API reference renders the target;
* a name that resolves outside the package (``torch.nn.Module``) stays inline code;
* a name that resolves nowhere logs a warning naming the object and the role, which also
  fails the strict build.

Used from ``mkdocs.yml``::

    extensions:
      - docs/_hooks/sphinx_roles.py:SphinxRoles
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
from typing import Any

import griffe

LOG = logging.getLogger("mkdocs.plugins.zae_trainer_docs")

#: ``:role:`target``` and ``:role:`~target``` (the tilde shows only the last component)
ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|data|attr|exc|obj|const):`(~?)([\w.]+)(?:\(\))?`")
PACKAGE = "zae_trainer"


def _package_of(obj: Any) -> Any:
    """The package a relative name (``.schema``) in ``obj``'s docstring is relative to."""
    module = obj if obj.is_module else obj.module
    return module if (module.is_package or module.is_subpackage or module.is_init_module) else module.parent


def _resolve(obj: Any, dotted: str, package: str) -> str | None:
    """Full path of ``dotted`` as seen from ``obj``'s docstring, or None."""
    if dotted == package or dotted.startswith(package + "."):
        return dotted
    if dotted.startswith("."):
        return f"{_package_of(obj).path}{dotted}"
    head, _, rest = dotted.partition(".")
    scope = obj
    while scope is not None:
        try:
            path = scope.resolve(head)
        except (griffe.NameResolutionError, AttributeError, KeyError):
            path = None
        if path is None and getattr(scope, "name", None) == head:
            path = scope.path
        if path is not None:
            return f"{path}.{rest}" if rest else path
        scope = scope.parent
    try:  # a module outside the package, named in full (collections.abc.Mapping, torch.nn)
        if importlib.util.find_spec(head) is not None:
            return dotted
    except (ImportError, ValueError):
        pass
    return None


def _canonical(package: Any, path: str) -> str | None:
    """The canonical path of the object ``path`` names inside the package, or None.

    ``zae_trainer.Trainer`` is an alias of ``zae_trainer.trainer.Trainer``; links go to the
    latter, where the API reference renders it.
    """
    node = package
    for part in path.split(".")[1:]:
        try:
            node = node.members[part]
            if node.is_alias:
                node = node.final_target
        except (KeyError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return _imported(package, path)
    return str(node.path)


def _imported(package: Any, path: str) -> str | None:
    """Where ``path`` leads when imported: for names a module provides lazily, through a
    module-level ``__getattr__`` (``zae_trainer.addons.StateManagerAddon``), which static
    analysis cannot see. None if importing it fails."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # noqa: BLE001 - not a module: try a shorter prefix
            continue
        try:
            rest = parts[cut:]
            for i, attr in enumerate(rest):
                obj = getattr(obj, attr)
                if isinstance(obj, type):  # the rest lives in this class, found statically
                    real = f"{obj.__module__}.{obj.__qualname__}"
                    tail = rest[i + 1 :]
                    full = ".".join([real, *tail])
                    if full == path or not real.startswith(package.name + "."):
                        return None
                    return _canonical(package, full)
        except AttributeError:
            return None
        return None
    return None


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of one package (``zae_trainer`` by default)."""

    def __init__(self, package: str = PACKAGE) -> None:
        super().__init__()
        self.package = package

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        if pkg.name != self.package:
            return
        self._walk(pkg, pkg, set())

    def _walk(self, package: Any, obj: Any, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self._rewrite(package, obj, obj.docstring.value)
        for member in list(obj.members.values()):
            if member.is_alias:
                continue
            self._walk(package, member, seen)

    def _rewrite(self, package: Any, obj: Any, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            role, tilde, dotted = match.groups()
            shown = dotted.rsplit(".", 1)[-1] if tilde else dotted
            if role in ("meth", "func"):
                shown += "()"
            path = _resolve(obj, dotted, self.package)
            if path is None:
                LOG.warning(
                    "%s: the docstring names :%s:`%s`, which does not resolve. To fix, use the "
                    "current name or the full dotted path.",
                    obj.path,
                    role,
                    dotted,
                )
                return f"`{shown}`"
            if not path.startswith(self.package + ".") and path != self.package:
                return f"`{shown}`"  # outside the package (torch, stdlib): plain code
            canonical = _canonical(package, path)
            if canonical is None:
                LOG.warning(
                    "%s: the docstring names :%s:`%s` (%s), which does not exist. To fix, use "
                    "the current name.",
                    obj.path,
                    role,
                    dotted,
                    path,
                )
                return f"`{shown}`"
            # optional: a link where the API reference renders the target, plain code where it
            # does not (private helpers); that the target exists was checked just above
            return f'<autoref identifier="{canonical}" optional><code>{shown}</code></autoref>'

        return ROLE.sub(replace, text)
