"""Package metadata is true: torch floor, no cap, extras, licence, one version, mypy."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package (dev extra)
    import tomli as tomllib  # type: ignore[no-redef]

import pytest

import zae_trainer

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _floor_tool() -> Any:
    spec = importlib.util.spec_from_file_location("check_torch_floor", ROOT / "tools" / "check_torch_floor.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_the_declared_torch_floor_is_the_newest_api_the_code_uses_and_nothing_caps_torch() -> None:
    tool = _floor_tool()
    assert tool.static_problems() == []
    uses = tool.find_uses()
    assert tool.required_floor(uses) == tool.declared_floor()[0] == (2, 6)
    assert any(u.api.path == "torch.nn.utils.get_total_norm" and u.file.name == "clipping.py" for u in uses)


def test_the_floor_check_catches_a_floor_too_low_and_an_upper_cap(tmp_path: Path) -> None:
    tool = _floor_tool()
    text = (ROOT / "pyproject.toml").read_text()
    stale = tmp_path / "pyproject.toml"
    stale.write_text(re.sub(r'"torch>=[^"]*"', '"torch>=2.1,<2.15"', text, count=1))
    problems = tool.static_problems(stale)
    assert any("declares torch>=2.1 but the code needs torch>=2.6" in p and "get_total_norm" in p for p in problems)
    assert any("caps torch (<2.15)" in p for p in problems)


def test_every_api_in_the_floor_table_exists_in_the_installed_torch() -> None:
    """A typo in the table would make the check meaningless; at the floor, this is the runtime proof."""
    assert _floor_tool().unresolved_apis() == []


def test_one_version_source() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "zae_trainer.__version__"}
    assert importlib.metadata.version("zae_trainer") == zae_trainer.__version__


def test_the_licence_file_is_the_declared_apache_2_licence() -> None:
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 11000


def test_all_holds_user_features_and_dev_the_test_toolchain() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    (all_line,) = extras["all"]
    included = set(re.fullmatch(r"zae_trainer\[(.*)\]", all_line)[1].split(","))  # type: ignore[index]
    assert "dev" not in included and "bench" not in included and "docs" not in included
    assert {"wandb", "neptune", "mlflow", "accelerate", "metrics"} <= included
    assert any(r.startswith("pytest") for r in extras["dev"]) and any(r.startswith("mypy") for r in extras["dev"])
    assert extras["metrics"] == ["torchmetrics>=1.0"]
    ci = (ROOT / ".ci" / "run").read_text()
    installed = re.search(r'pip install -q -e "\.\[([^"]*)\]"', ci)
    assert installed is not None and {"all", "dev"} <= set(installed[1].split(",")), "CI must install all and dev"


@pytest.mark.slow
def test_mypy_passes_under_the_configured_strictness(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    command = [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", str(tmp_path / "mypy-cache")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_fsdp_on_the_cpu_is_refused_where_torch_cannot_run_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one configuration that needs more than the floor: FSDP2 on a CPU needs torch 2.7
    (torch.cpu.Stream.record_event); on 2.6 it is refused at construction, not at the first step."""
    import torch

    from zae_trainer.addons.distributed.fsdp import FSDPAddon
    from zae_trainer.errors import TrainerConfigError
    from zae_trainer.testing import TinyRegressionTrainer, tiny_trainer

    built = TinyRegressionTrainer.add_on(FSDPAddon)
    if hasattr(torch.cpu.Stream, "record_event"):  # torch >= 2.7: it constructs; then pretend to be 2.6
        tiny_trainer(built, world_size=2)
        monkeypatch.delattr(torch.cpu.Stream, "record_event")
    with pytest.raises(TrainerConfigError, match=r"FSDPAddon on the CPU needs torch 2\.7 or newer.*To fix"):
        tiny_trainer(built, world_size=2)
