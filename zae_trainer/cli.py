"""The ``zae-trainer`` command line.

    zae-trainer fit CONFIG.yaml [--set key.path=value ...]   train as the config says
    zae-trainer addons                                        list built-in and installed add-ons
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

__all__ = ["main"]


def _fit(args: argparse.Namespace) -> int:
    from .config import apply_overrides, fit, load_config

    if os.getcwd() not in sys.path:  # factories named by import path usually live beside the config
        sys.path.insert(0, os.getcwd())
    config = apply_overrides(load_config(args.config), args.set or [])
    trainer = fit(config)
    best = trainer.best
    if best.get("value") is not None:
        print(f"best {best['metric']} = {best['value']:.6g} (epoch {best['epoch']})")
    return 0


def _addons(args: argparse.Namespace) -> int:
    from .addons import available

    rows = available()
    if not rows:
        print("no add-ons found")
        return 0
    width = max(len(name) for name in rows)
    for name, info in sorted(rows.items()):
        settings = ", ".join(info["settings"]) if info["settings"] else "-"
        status = "" if info["importable"] else f"  (not importable: {info['error']})"
        print(f"{name:<{width}}  {info['class']}  [{info['distribution']}]  settings: {settings}{status}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zae-trainer", description="zae_trainer command line")
    commands = parser.add_subparsers(dest="command", required=True)
    fit_parser = commands.add_parser("fit", help="train from a YAML config")
    fit_parser.add_argument("config", help="path to a YAML (or JSON) config")
    fit_parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config entry, e.g. optimizer.lr=0.01"
    )
    fit_parser.set_defaults(handler=_fit)
    addons_parser = commands.add_parser("addons", help="list built-in and installed add-ons")
    addons_parser.set_defaults(handler=_addons)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:
        print(f"zae-trainer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
