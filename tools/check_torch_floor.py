"""Check that the torch floor declared in pyproject.toml is the oldest torch the code runs on.

Two checks, both runnable in CI:

``python tools/check_torch_floor.py`` (static, any torch)
    Scans the package and the example add-ons for the torch APIs in :data:`KNOWN_APIS`, each
    with the first torch release that has it. The newest of those releases must equal the
    floor in ``pyproject.toml`` (``torch>=X.Y``): a lower floor promises versions the code
    fails on; a higher one refuses versions it runs on. The same table is checked against
    the installed torch: every entry must resolve there, so a typo in the table fails too.

``python tools/check_torch_floor.py --runtime`` (with torch at the floor installed)
    Resolves every API of the table in the installed torch and imports every module of the
    package. Run it after ``pip install torch==<floor>`` (CPU wheels:
    ``--index-url https://download.pytorch.org/whl/cpu``) to prove the floor; then run the
    test suite there too. Without that index, the default wheel works on a CPU as well, kept
    apart from the main environment: ``pip install --target /tmp/torch-floor torch==2.6.0``,
    then ``PYTHONPATH=/tmp/torch-floor python tools/check_torch_floor.py --runtime`` and
    ``PYTHONPATH=/tmp/torch-floor python -m pytest tests/...``. Done for 2.6.0: the runtime
    check holds and the core, transfer, seed, metrics, control, state and EMA tests pass.
    (The multi-process FSDP tests need 2.7 on a CPU: see below.)

One configuration needs more than the floor, and is refused with a clear error below it:
``FSDPAddon`` on a CPU (gloo) needs torch 2.7, where ``torch.cpu.Stream.record_event`` (which
FSDP2 calls) appeared; measured at 2.6.0, FSDP on the CPU fails there with an AttributeError.

Guarded uses (``getattr(torch, "xpu", None)``, ``hasattr(loader, "in_order")``) are not floor
requirements and are not listed. When code starts using a newer torch API, add it here.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package (dev extra)
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
SCANNED = (ROOT / "zae_trainer", ROOT / "addons")


@dataclass(frozen=True)
class Api:
    """A torch API, how to find its use in source, and the first release that has it."""

    path: str  # dotted path, resolved at runtime: "torch.nn.utils.get_total_norm"
    pattern: str  # regular expression matched against the source
    since: tuple[int, int]
    note: str = ""


KNOWN_APIS: tuple[Api, ...] = (
    Api("torch.nn.utils.get_total_norm", r"\bget_total_norm\b", (2, 6), "clipping and the non-finite guard"),
    Api("torch.nn.utils.clip_grads_with_norm_", r"\bclip_grads_with_norm_\b", (2, 6)),
    Api("torch.distributed.fsdp.fully_shard", r"\bfully_shard\b", (2, 6), "FSDP2 public in torch.distributed.fsdp"),
    Api("torch.distributed.fsdp.FSDPModule", r"\bFSDPModule\b", (2, 6)),
    Api("torch.distributed.fsdp.MixedPrecisionPolicy", r"\bMixedPrecisionPolicy\b", (2, 6)),
    Api("torch.distributed.fsdp.CPUOffloadPolicy", r"\bCPUOffloadPolicy\b", (2, 6)),
    Api("torch.amp.is_autocast_available", r"\bis_autocast_available\b", (2, 4)),
    Api("torch.amp.GradScaler", r"\bamp\.GradScaler\b", (2, 3), "device-generic GradScaler('cuda')"),
    Api("torch.distributed.checkpoint.format_utils", r"checkpoint\.format_utils\b", (2, 3)),
    Api("torch.distributed.checkpoint.async_save", r"\basync_save\(", (2, 3)),
    Api("torch.distributed.checkpoint.state_dict.get_model_state_dict", r"checkpoint\.state_dict\b", (2, 2)),
    Api("torch.distributed.device_mesh.init_device_mesh", r"\binit_device_mesh\b", (2, 2)),
    Api("torch.optim.swa_utils.get_ema_multi_avg_fn", r"\bget_ema_multi_avg_fn\b", (2, 1), "EMA plugin"),
    Api("torch.optim.lr_scheduler.LRScheduler", r"lr_scheduler\.LRScheduler\b", (2, 0)),
)


@dataclass(frozen=True)
class Use:
    api: Api
    file: Path
    line: int


def find_uses(roots: tuple[Path, ...] = SCANNED) -> list[Use]:
    """Every line of the scanned Python sources (tests excluded) that uses a listed API."""
    uses = []
    compiled = [(api, re.compile(api.pattern)) for api in KNOWN_APIS]
    for root in roots:
        for file in sorted(root.rglob("*.py")):
            if "tests" in file.relative_to(root).parts or file == Path(__file__).resolve():
                continue
            for number, text in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
                for api, regex in compiled:
                    if regex.search(text):
                        uses.append(Use(api, file, number))
    return uses


def required_floor(uses: list[Use]) -> tuple[int, int]:
    return max((u.api.since for u in uses), default=(2, 0))


def declared_floor(pyproject: Path = ROOT / "pyproject.toml") -> tuple[tuple[int, int], str | None]:
    """The ``torch>=X.Y`` floor of the package's dependencies, and any upper bound found."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    for requirement in data["project"]["dependencies"]:
        match = re.fullmatch(r"torch\s*>=\s*(\d+)\.(\d+)(?:\.\d+)?\s*(,.*)?", requirement.strip())
        if match:
            return (int(match[1]), int(match[2])), match[3]
    raise SystemExit(f"{pyproject}: no 'torch>=X.Y' in [project] dependencies")


def resolve(path: str) -> object:
    """The object at a dotted path, importing modules on the way."""
    parts = path.split(".")
    obj: object = importlib.import_module(parts[0])
    for i, name in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def unresolved_apis() -> list[str]:
    """Table entries the installed torch lacks (each with the error)."""
    missing = []
    for api in KNOWN_APIS:
        try:
            resolve(api.path)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{api.path} (listed as new in {api.since[0]}.{api.since[1]}): {exc}")
    return missing


def static_problems(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """What is wrong with the declared floor, given the APIs the code uses; empty when right."""
    uses = find_uses()
    needed = required_floor(uses)
    declared, upper = declared_floor(pyproject)
    problems = []
    if declared != needed:
        newest = [u for u in uses if u.api.since == needed]
        where = ", ".join(f"{u.api.path} in {u.file.relative_to(ROOT)}:{u.line}" for u in newest[:5])
        problems.append(
            f"pyproject.toml declares torch>={declared[0]}.{declared[1]} but the code needs "
            f"torch>={needed[0]}.{needed[1]} ({where}). To fix, set the floor to {needed[0]}.{needed[1]}"
            " (or stop using those APIs)."
        )
    if upper:
        problems.append(f"pyproject.toml caps torch ({upper.strip(', ')}): remove the cap so the next torch installs.")
    problems.extend(f"the table names an API this torch lacks: {m}" for m in unresolved_apis())
    return problems


def runtime_problems() -> list[str]:
    """APIs or package modules that fail with the installed torch."""
    problems = [f"missing in torch {_torch_version()}: {m}" for m in unresolved_apis()]
    import zae_trainer

    for module in pkgutil.walk_packages(zae_trainer.__path__, "zae_trainer."):
        if module.name.endswith("__main__"):  # running it is the command line, not an import
            continue
        try:
            importlib.import_module(module.name)
        except ImportError as exc:
            if exc.name and not exc.name.startswith("torch"):  # an optional extra, not torch
                continue
            problems.append(f"import {module.name} fails with torch {_torch_version()}: {exc}")
    return problems


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runtime", action="store_true", help="check the installed torch (run at the floor)")
    args = parser.parse_args(argv)
    problems = runtime_problems() if args.runtime else static_problems()
    for problem in problems:
        print(f"check_torch_floor: {problem}", file=sys.stderr)
    if not problems:
        declared, _ = declared_floor()
        mode = f"runtime, torch {_torch_version()}" if args.runtime else "static"
        print(f"check_torch_floor: torch>={declared[0]}.{declared[1]} holds ({mode}, {len(KNOWN_APIS)} APIs known)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
