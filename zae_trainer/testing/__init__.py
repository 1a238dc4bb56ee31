"""Test helpers and the add-on conformance suite, for our tests and for plugin authors.

An add-on author checks their add-on against everything an add-on must do with one call::

    from zae_trainer.testing import check_addon

    def test_my_addon_conforms(tmp_path):
        check_addon(MyAddon, settings={"decay": 0.9}, workdir=tmp_path)

or runs the checks one by one (each raises ``AssertionError`` with a reason):
:func:`check_hook_names`, :func:`check_composes_with_builtins`,
:func:`check_state_round_trip`, :func:`check_no_per_step_sync`, :func:`check_pickling`.
"""

from __future__ import annotations

from .conformance import (
    BUILTIN_FACTORIES,
    check_addon,
    check_composes_with_builtins,
    check_hook_names,
    check_no_per_step_sync,
    check_pickling,
    check_state_round_trip,
    usable_builtins,
)
from .tiny import TinyRegressionTrainer, tiny_loader, tiny_trainer

__all__ = [
    "check_addon",
    "check_hook_names",
    "check_composes_with_builtins",
    "check_state_round_trip",
    "check_no_per_step_sync",
    "check_pickling",
    "usable_builtins",
    "BUILTIN_FACTORIES",
    "TinyRegressionTrainer",
    "tiny_loader",
    "tiny_trainer",
]
