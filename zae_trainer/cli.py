"""The ``zae-trainer`` command line.

    zae-trainer fit CONFIG.yaml [--set key.path=value ...] [--out DIR] [--resume latest|best|PATH]
    zae-trainer addons                      list built-in and installed add-ons with their defaults
    zae-trainer --version

``fit`` keeps a run folder (``--out``, default ``runs/<config name>``, numbered ``-2``, ``-3``
when taken) holding ``logs/`` (the local logger's metrics), ``ckpt/`` (checkpoints, best and
last) and, when the run ends, ``best.safetensors`` and ``final.safetensors`` (weights only).
Add-ons the config already names (a ``state_manager`` with its own ``save_path``, say) are
kept as written; ``--no-out`` saves nothing and says so.

Ctrl-C (SIGINT) or SIGTERM stops at the next batch boundary, writes an emergency checkpoint
and prints the command that resumes from it. Errors in the config exit with status 2 and one
line naming the key path; errors raised by the user's own model or data code keep their
traceback.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["main"]

EXIT_CONFIG = 2
EXIT_SIGINT = 130


def _prog() -> str:
    """How the user started us, for the commands we print."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "zae-trainer" if name.startswith("zae-trainer") else f"{os.path.basename(sys.executable)} -m zae_trainer"


# -- the run folder ---------------------------------------------------------------------------


def _addon_entries(config: dict[str, Any]) -> list[Any]:
    """The config's ``addons`` as a list (a mapping form is converted in place)."""
    entry = config.get("addons")
    if entry is None:
        config["addons"] = []
    elif isinstance(entry, Mapping):
        config["addons"] = [{"name": name, **dict(settings or {})} for name, settings in entry.items()]
    return config["addons"] if isinstance(config["addons"], list) else []


def _find_addon(entries: list[Any], cls: type) -> dict[str, Any] | None:
    """The config entry naming ``cls`` (converted to a mapping so it can be changed), if any."""
    from .registry import resolve

    for i, item in enumerate(entries):
        name = item if isinstance(item, str) else item.get("name") if isinstance(item, Mapping) else None
        if not isinstance(name, str):
            continue
        try:
            found = resolve(name)
        except (KeyError, RuntimeError):
            continue  # reported with its key path when the trainer is built
        if isinstance(found, type) and issubclass(found, cls):
            if isinstance(item, str):
                entries[i] = {"name": item}
            return entries[i]  # type: ignore[no-any-return]
    return None


def _fresh_folder(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``... whichever is missing or empty."""
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _prepare_run_folder(config: dict[str, Any], args: argparse.Namespace) -> tuple[Path | None, str | None]:
    """Add a state manager and a local logger writing under the run folder, unless the
    config has its own. Returns ``(run folder or None, checkpoint folder or None)``."""
    from .addons.local_logger import LocalLoggerAddon
    from .addons.state_manager import StateManagerAddon

    entries = _addon_entries(config)
    manager = _find_addon(entries, StateManagerAddon)
    if args.no_out:
        print(
            "zae-trainer: note: --no-out: this run saves nothing of its own (no logs, no weights); only add-ons "
            "named in the config write files.",
            file=sys.stderr,
        )
        if args.resume is not None and manager is None:
            raise _UsageError("--resume needs checkpoints: drop --no-out, or add a state_manager to the config")
        if manager is not None and args.resume is not None:
            manager["resume"] = args.resume
        return None, str(manager["save_path"]) if manager is not None and "save_path" in manager else None
    if args.out is not None:
        out = Path(args.out)
        if args.resume is None and out.exists() and any(out.iterdir()):
            raise _UsageError(
                f"the run folder {str(out)!r} already holds a run. To continue it, add --resume latest; to start "
                "a new run, pass another --out (or leave --out out: runs/<config name> is numbered when taken)."
            )
    else:
        base = Path("runs") / Path(args.config).stem
        out = base if args.resume is not None else _fresh_folder(base)
    if manager is None:
        manager = {"name": "state_manager", "save_path": str(out / "ckpt")}
        entries.append(manager)
    if args.resume is not None:
        manager["resume"] = args.resume
    if _find_addon(entries, LocalLoggerAddon) is None:
        entries.append({"name": "local_logger", "log_dir": str(out / "logs")})
    return out, str(manager.get("save_path"))


class _UsageError(Exception):
    """A command-line mistake: reported in one line, exit status 2."""


# -- fit ----------------------------------------------------------------------------------------


def _resume_now(trainer: Any) -> None:
    """Restore the checkpoint the state manager was asked to resume from, and say which.

    Done here, before ``run()``, so the command line can report it; the state manager then
    has nothing left to do at ``RUN_BEGIN``.
    """
    try:
        manager = trainer.get_addon("state_manager")
    except KeyError:
        return
    source = getattr(manager, "resume", None)
    if source is None:
        return
    manager.resume = None
    path = trainer.load_state(source)
    pc = trainer.progress_checker
    if path is None:
        print(f"nothing to resume in {manager.save_path} ({source!r}): starting a new run", flush=True)
        return
    where = f", batch {pc.batch_in_epoch} of epoch {pc.epoch + 1}" if pc.batch_in_epoch else ""
    print(f"resumed from {path}, epoch {pc.epoch}, step {pc.step}{where}", flush=True)


def _resume_command(args: argparse.Namespace, out: Path | None) -> str:
    words = [*_prog().split(), "fit", args.config]
    for item in args.set or []:
        words += ["--set", item]
    if out is not None:
        words += ["--out", str(out)]
    if args.no_out:
        words.append("--no-out")
    return shlex.join([*words, "--resume", "latest"])


def _emergency_checkpoint(save_path: str | None, trainer: Any) -> str | None:
    """The path of the checkpoint written on the interrupt, if one was."""
    if save_path is None:
        return None
    from .addons.checkpoint.manifest import Manifest

    try:
        latest = Manifest.load(save_path, mode=trainer.monitor_mode).latest()
    except Exception:  # an unreadable manifest: the message below says where to look
        return None
    if latest is None or not set(latest.reasons) & {"interrupt", "exception"}:
        return None
    return os.path.join(save_path, latest.name)


def _report_interrupt(trainer: Any, args: argparse.Namespace, out: Path | None, save_path: str | None,
                      what: str) -> None:
    pc = trainer.progress_checker
    lines = [f"zae-trainer: {what} at epoch {pc.epoch + 1}, step {pc.step}."]
    checkpoint = _emergency_checkpoint(save_path, trainer)
    if checkpoint is not None:
        lines.append(f"  emergency checkpoint: {checkpoint}")
        lines.append(f"  resume with: {_resume_command(args, out)}")
    elif save_path is not None:
        lines.append(f"  no emergency checkpoint was written; checkpoints so far are in {save_path}")
        lines.append(f"  resume from the latest with: {_resume_command(args, out)}")
    else:
        lines.append("  nothing was saved (no state manager in this run).")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _export_weights(trainer: Any, out: Path) -> list[str]:
    """Weights-only copies of the best and the final model in the run folder."""
    written: list[str] = []
    try:
        manager = trainer.get_addon("state_manager")
    except KeyError:
        return written
    if trainer.best.get("epoch") is not None:
        try:
            trainer.export_weights(out / "best.safetensors", source="best")
            written.append(f"{out / 'best.safetensors'} (epoch {trainer.best['epoch']})")
        except Exception as exc:  # the run itself succeeded; say why there is no copy
            print(f"zae-trainer: note: best weights not exported from {manager.save_path}: {exc}", file=sys.stderr)
    trainer.export_weights(out / "final.safetensors")
    written.append(str(out / "final.safetensors"))
    return written


def _fit(args: argparse.Namespace) -> int:
    from .config import apply_overrides, build_data, build_trainer, load_config, run_length
    from .addons.checkpoint.errors import CheckpointError
    from .errors import TrainingTerminated

    if os.getcwd() not in sys.path:  # import paths relative to where the command runs
        sys.path.insert(0, os.getcwd())
    config_path = Path(args.config)
    if not config_path.is_file():
        raise _UsageError(f"config file {str(config_path)!r} does not exist")
    config = apply_overrides(load_config(config_path), args.set or [])
    base_dir = config_path.resolve().parent
    n_epoch = run_length(config)
    out, save_path = _prepare_run_folder(config, args)
    trainer = build_trainer(config, base_dir=base_dir)
    train, valid = build_data(config, base_dir=base_dir)
    if out is not None:
        print(f"run folder: {out} (logs in {out / 'logs'}, checkpoints in {save_path})", flush=True)
    try:
        _resume_now(trainer)
    except CheckpointError as exc:
        raise _UsageError(f"cannot resume: {exc}") from None
    remaining = n_epoch - trainer.progress_checker.epoch  # run.n_epoch counts the whole run, resumes included
    if remaining < 1:
        print(f"the run already has {trainer.progress_checker.epoch} epoch(s) of run.n_epoch={n_epoch}; nothing to do. "
              "To train longer, raise it: --set run.n_epoch=N")
        return 0
    try:
        trainer.run(remaining, train, valid)
    except KeyboardInterrupt:
        _report_interrupt(trainer, args, out, save_path, "interrupted (Ctrl-C)")
        return EXIT_SIGINT
    except TrainingTerminated as exc:
        _report_interrupt(trainer, args, out, save_path, "terminated (SIGTERM)")
        return int(exc.exit_code)
    best = trainer.best
    if best.get("value") is not None:
        print(f"best {best['metric']} = {best['value']:.6g} (epoch {best['epoch']})")
    if out is not None:
        for line in _export_weights(trainer, out):
            print(f"weights: {line}")
    return 0


# -- addons --------------------------------------------------------------------------------------


def _format_settings(settings: Mapping[str, Any]) -> str:
    if not settings:
        return "-"
    return ", ".join(f"{k} (required)" if v == "<required>" else f"{k}={v!r}" for k, v in settings.items())


def _addons(args: argparse.Namespace) -> int:
    from .addons import available

    rows = available()
    if not rows:
        print("no add-ons found")
        return 0
    width = max(len(name) for name in rows)
    for name, info in sorted(rows.items()):
        status = "" if info["importable"] else f"  (not importable: {info['error']})"
        print(f"{name:<{width}}  {info['class']}  [{info['distribution']}]  settings: "
              f"{_format_settings(info['settings'])}{status}")
    return 0


# -- entry point ---------------------------------------------------------------------------------


def _version() -> str:
    from . import __version__

    try:
        import torch

        torch_version = str(torch.__version__)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        torch_version = "not installed"
    return f"zae-trainer {__version__} (torch {torch_version}, python {platform.python_version()})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from .errors import TrainerConfigError

    parser = argparse.ArgumentParser(prog="zae-trainer", description="zae_trainer command line")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True)
    fit_parser = commands.add_parser("fit", help="train from a YAML config")
    fit_parser.add_argument("config", help="path to a YAML (or JSON) config")
    fit_parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config entry, e.g. optimizer.lr=3e-3"
    )
    fit_parser.add_argument(
        "--out", default=None, help="run folder for logs, checkpoints and weights (default: runs/<config name>)"
    )
    fit_parser.add_argument("--no-out", action="store_true", help="keep no run folder (nothing is saved)")
    fit_parser.add_argument(
        "--resume", metavar="SOURCE", default=None,
        help="continue from a checkpoint of the run folder: latest, best, or a checkpoint path",
    )
    fit_parser.set_defaults(handler=_fit)
    addons_parser = commands.add_parser("addons", help="list built-in and installed add-ons with their defaults")
    addons_parser.set_defaults(handler=_addons)
    args = parser.parse_args(argv)
    if getattr(args, "no_out", False) and args.out is not None:
        parser.error("--out and --no-out exclude each other")
    try:
        return int(args.handler(args))
    except (TrainerConfigError, _UsageError) as exc:
        print(f"zae-trainer: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # before training started: nothing to save
        print("zae-trainer: interrupted before training started; nothing was saved.", file=sys.stderr)
        return EXIT_SIGINT


if __name__ == "__main__":
    raise SystemExit(main())
