"""Every Python example in the README and the docs runs, as written.

Each page's ```` ```python ```` blocks are extracted and executed in order, in one fresh
module namespace per page (so a later block may use what an earlier one defined, as a reader
would), with a fresh temporary folder as the working directory (examples write runs/,
checkpoints and logs there, never into the repository).

A block that is not meant to run (it needs several GPUs, a cluster, a launcher, or shows a
fragment) is marked by an HTML comment on the line before its fence, which renders as
nothing on GitHub and on the site::

    <!-- norun: needs two GPUs -->
    ```python
    ...
    ```

The reason is required, so a reader of the source sees why. Blocks in other languages
(``bash``, ``yaml``, ``text``) are never run; the two shell commands of the README are
checked by ``tests/test_readme.py``.
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NORUN = re.compile(r"^<!--\s*norun:\s*\S.*-->\s*$")
NORUN_WITHOUT_REASON = re.compile(r"^<!--\s*norun\s*:?\s*-->\s*$")
FENCE_OPEN = re.compile(r"^(\s*)```python\b.*$")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    code: str
    runs: bool


def pages() -> list[Path]:
    """The README and every Markdown page of the site (build helpers and data files excluded)."""
    docs = ROOT / "docs"
    found = [ROOT / "README.md"]
    for path in sorted(docs.rglob("*.md")):
        rel = path.relative_to(docs).parts
        if rel[0] in ("_hooks", "benchmarks-data"):
            continue
        found.append(path)
    return found


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a page, with whether each is meant to run."""
    lines = path.read_text().splitlines()
    rel = str(path.relative_to(ROOT))
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE_OPEN.match(lines[i])
        if not match:
            i += 1
            continue
        indent = match.group(1)
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(Block(rel, start + 1, "\n".join(body) + "\n", runs=not NORUN.match(previous)))
        i += 1
    return blocks


PAGES = [p for p in pages() if any(b.runs for b in python_blocks(p))]
#: pages whose examples start real W&B / Neptune / MLflow clients (offline): seconds each
SLOW_PAGES = {"docs/guides/logging.md"}


def test_norun_markers_give_a_reason() -> None:
    bare = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in pages()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if NORUN_WITHOUT_REASON.match(line.strip())
    ]
    assert not bare, f"norun markers without a reason (write <!-- norun: why -->): {bare}"


def test_the_readme_quickstart_is_executed() -> None:
    readme = python_blocks(ROOT / "README.md")
    assert readme and readme[0].runs, "the README's first Python block (the quickstart) must run"


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, marks=[pytest.mark.slow] if str(p.relative_to(ROOT)) in SLOW_PAGES else [])
        for p in PAGES
    ],
    ids=[str(p.relative_to(ROOT)) for p in PAGES],
)
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # The page's namespace is a registered module, as a reader's script would be: classes
    # defined in an example pickle by reference (the conformance suite checks that they do).
    module = types.ModuleType("docs_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for block in python_blocks(page):
        if not block.runs:
            continue
        # padded so that a traceback's line numbers are the page's own
        code = compile("\n" * block.line + block.code, block.page, "exec")
        exec(code, module.__dict__)  # noqa: S102 - the point of the test
