"""The README's two commands stay true: CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks[:2]:
        lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        commands.append(lines[0].strip())
    return commands


def test_ci_runs_exactly_the_readme_test_command_last() -> None:
    _, test_command = _readme_commands()
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ci_lines[-1] == test_command


def test_ci_installs_what_the_readme_install_command_installs() -> None:
    install, _ = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in install and "pip install -q torch==2.13.0" in ci
    assert 'pip install -e ".[all]"' in install and '-e ".[all' in ci
    assert install.endswith("python examples/train_digits.py")
    assert (ROOT / "examples" / "train_digits.py").exists()


def test_readme_lists_every_builtin_addon_with_its_class() -> None:
    """The README's add-on table names exactly the registry's built-ins, each with its class."""
    from zae_trainer.registry import BUILTIN_ADDONS

    text = (ROOT / "README.md").read_text()
    section = text.split("## Built-in add-ons", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \|", section, flags=re.M)
    listed = dict(rows)
    expected = {name: target.split(":")[1] for name, target in BUILTIN_ADDONS.items()}
    assert listed == expected


def test_readme_links_point_at_files_that_exist() -> None:
    text = (ROOT / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    missing = [t for t in targets if t and not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
