"""MkDocs hook: settings tables generated from the code, so they cannot disagree with it.

A page writes a marker on a line of its own::

    <!-- settings: zae_trainer.addons.clipping:GradientClippingAddon -->

and the built page shows a table with one row per parameter of that class's constructor:
its name and default from ``inspect.signature``, and its meaning from the ``Parameters``
section of the class's numpy-style docstring. A parameter the docstring does not describe,
or a documented parameter the constructor no longer has, is a warning, which fails
``mkdocs build --strict`` (and ``tests/test_docs_settings.py``).

The same functions serve the tests: :func:`problems` lists what is wrong with one target.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from typing import Any

LOG = logging.getLogger("mkdocs.plugins.zae_trainer_docs")

MARKER = re.compile(r"^<!--[ \t]*settings:[ \t]*([\w.]+):([\w.]+)[ \t]*-->[ \t]*$", re.M)
_SECTION = re.compile(r"^(\w[\w ]*)\n-{3,}\s*$", re.M)
_ROLE = re.compile(r":(?:py:)?\w+:`~?([\w.]+)`")


def load(target: str) -> type:
    """The class that ``"module:Class"`` names."""
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise TypeError(f"{target} is not a class")
    return obj


def documented_parameters(cls: type) -> dict[str, str]:
    """``{name: description}`` from the ``Parameters`` section of the class docstring.

    Numpy style: a line ``name : type`` (or ``a, b : type``, or ``**name``) at the section's
    indentation, then the description indented below it.
    """
    doc = inspect.cleandoc(cls.__doc__ or "")
    if "Parameters\n" not in doc and cls.__init__.__doc__:
        doc = inspect.cleandoc(cls.__init__.__doc__)
    sections = _SECTION.split(doc)
    # split gives [before, title1, body1, title2, body2, ...]
    body = next((sections[i + 1] for i in range(1, len(sections) - 1, 2) if sections[i].strip() == "Parameters"), "")
    params: dict[str, str] = {}
    names: list[str] = []
    for line in body.splitlines():
        if line and not line[0].isspace():
            head = line.split(" : ", 1)[0].strip().rstrip(":")
            names = [n.strip().lstrip("*") for n in head.split(",") if n.strip()]
            for name in names:
                params[name] = ""
        elif line.strip() and names:
            for name in names:
                params[name] = (params[name] + " " + line.strip()).strip()
    return params


def signature_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The constructor's parameters after ``self`` (``*args`` left out, ``**kwargs`` kept)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p for p in params if p.kind is not p.VAR_POSITIONAL}


def problems(target: str) -> list[str]:
    """What keeps the table of ``target`` from being complete and true; empty when fine."""
    cls = load(target)
    documented = documented_parameters(cls)
    actual = signature_parameters(cls)
    found = [f"{target}: parameter {name!r} has no description in the docstring's Parameters section"
             for name in actual if not documented.get(name)]
    found += [f"{target}: the docstring describes {name!r}, which the constructor does not take"
              for name in documented if name not in actual]
    return found


def _default(param: inspect.Parameter) -> str:
    if param.kind is param.VAR_KEYWORD:
        return ""
    if param.default is param.empty:
        return "required"
    return f"`{param.default!r}`"


def _cell(text: str) -> str:
    text = _ROLE.sub(r"`\1`", text).replace("``", "`")
    return text.replace("|", "\\|")


def table(target: str) -> str:
    """The Markdown settings table of ``target``'s constructor."""
    cls = load(target)
    documented = documented_parameters(cls)
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for name, param in signature_parameters(cls).items():
        shown = f"**{name}" if param.kind is param.VAR_KEYWORD else name
        rows.append(f"| `{shown}` | {_default(param)} | {_cell(documented.get(name, ''))} |")
    return "\n".join(rows)


def targets_in(markdown: str) -> list[str]:
    """Every ``module:Class`` a page's settings markers name."""
    return [f"{module}:{attr}" for module, attr in MARKER.findall(markdown)]


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """MkDocs event: replace each marker by its generated table."""

    def replace(match: re.Match[str]) -> str:
        target = f"{match.group(1)}:{match.group(2)}"
        try:
            for problem in problems(target):
                LOG.warning("%s: %s", page.file.src_uri, problem)
            return table(target) + "\n"
        except Exception as exc:  # a renamed class or module: fail the strict build, say where
            LOG.warning("%s: settings table for %s: %s: %s", page.file.src_uri, target, type(exc).__name__, exc)
            return f"*(settings of `{target}` unavailable)*"

    return MARKER.sub(replace, markdown)
