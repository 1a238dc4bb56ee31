"""Trainer.add_on: building classes, routing settings, rejecting bad combinations, pickling."""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
from typing import Any

import pytest
import torch

from core_helpers import TinyTrainer, tiny_loader, tiny_trainer
from zae_trainer import AddOn, AddOnBase, AddOnDefinitionError, Trainer


class Alpha(AddOn):
    exports = ("alpha_value",)

    def __init__(self, *, shared: str = "default", alpha: int = 1) -> None:
        self.shared = shared
        self.alpha = alpha
        self.epochs = 0

    def alpha_value(self) -> int:
        return self.alpha

    def on_epoch_end(self, trainer: Any) -> None:
        self.epochs += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = state["epochs"]


class Beta(AddOn):
    def __init__(self, *, shared: str = "default", needed: float) -> None:
        self.shared = shared
        self.needed = needed


def test_add_on_returns_a_new_readable_class_and_leaves_the_base_untouched() -> None:
    built = TinyTrainer.add_on(Alpha, Beta)
    assert built is not TinyTrainer and issubclass(built, TinyTrainer)
    assert TinyTrainer.addons == () and not hasattr(TinyTrainer, "alpha_value")
    assert built.addons == (Alpha, Beta)
    assert built.__name__ == "TinyTrainer[Alpha, Beta]" and "TinyTrainer[Alpha, Beta]" in repr(built)


def test_chaining_and_subclassing_keep_every_addon() -> None:
    class UserTrainer(TinyTrainer.add_on(Alpha)):
        pass

    chained = UserTrainer.add_on(Beta)
    assert chained.addons == (Alpha, Beta)
    trainer = tiny_trainer(chained, needed=2.0)
    assert isinstance(trainer, UserTrainer)
    assert trainer.alpha_value() == 1 and trainer.get_addon(Beta).needed == 2.0


def test_class_and_configured_instance_are_both_accepted_and_constructor_keywords_win() -> None:
    built = TinyTrainer.add_on(Alpha(alpha=7), Beta)
    trainer = tiny_trainer(built, needed=1.5)
    assert trainer.get_addon(Alpha).alpha == 7
    trainer = tiny_trainer(built, needed=1.5, alpha=9)
    assert trainer.get_addon(Alpha).alpha == 9


def test_a_keyword_declared_by_several_addons_reaches_each_of_them() -> None:
    trainer = tiny_trainer(TinyTrainer.add_on(Alpha, Beta), shared="both", needed=0.0)
    assert trainer.get_addon(Alpha).shared == "both" and trainer.get_addon(Beta).shared == "both"


def test_unknown_keyword_names_it_and_the_closest_accepted_names() -> None:
    with pytest.raises(TypeError) as info:
        tiny_trainer(TinyTrainer.add_on(Alpha), alpah=3)
    message = str(info.value)
    assert "'alpah'" in message and "did you mean 'alpha'" in message


def test_unknown_keyword_close_to_a_core_setting_is_suggested() -> None:
    with pytest.raises(TypeError, match="did you mean 'log_every_n_steps'"):
        tiny_trainer(TinyTrainer, log_every_n_step=3)


def test_missing_required_setting_names_the_addon() -> None:
    with pytest.raises(TypeError, match=r"add-on 'Beta' needs the setting\(s\) \['needed'\]"):
        tiny_trainer(TinyTrainer.add_on(Beta))


def test_same_addon_twice_is_rejected_at_class_build_time() -> None:
    with pytest.raises(AddOnDefinitionError, match="applied twice"):
        TinyTrainer.add_on(Alpha, Alpha(alpha=2))
    with pytest.raises(AddOnDefinitionError, match="applied twice"):
        TinyTrainer.add_on(Alpha).add_on(Alpha)


def test_declared_conflict_is_rejected() -> None:
    class Gamma(AddOn):
        conflicts_with = ("Alpha",)

    with pytest.raises(AddOnDefinitionError, match="conflict with 'Alpha'"):
        TinyTrainer.add_on(Gamma, Alpha)


def test_misspelt_hook_fails_at_class_build_with_a_suggestion() -> None:
    class Typo(AddOn):
        def on_epoch_ned(self, trainer: Any) -> None:
            pass

    with pytest.raises(AddOnDefinitionError, match="on_epoch_ned.*Did you mean on_epoch_end"):
        TinyTrainer.add_on(Typo)


def test_hook_with_wrong_signature_fails_at_class_build() -> None:
    class WrongArgs(AddOn):
        def on_log(self, trainer: Any) -> None:  # LOG passes metrics too
            pass

    with pytest.raises(AddOnDefinitionError, match=r"on_log\(self, trainer, metrics\)"):
        TinyTrainer.add_on(WrongArgs)


def test_ordering_cycle_is_rejected() -> None:
    class P(AddOn):
        runs_after = ("Q",)

    class Q(AddOn):
        runs_after = ("P",)

    with pytest.raises(AddOnDefinitionError, match="cycle"):
        TinyTrainer.add_on(P, Q)


class _ScaleLossMixin:
    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss * 0.0)  # type: ignore[misc]


class ZeroLoss(AddOn):
    trainer_mixin = _ScaleLossMixin


def test_strategy_mixin_overrides_a_core_method_and_chains() -> None:
    trainer = tiny_trainer(TinyTrainer.add_on(ZeroLoss))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.run(1, tiny_loader())
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_two_strategies_overriding_one_method_must_declare_their_stacking() -> None:
    class _Other:
        def backward(self, loss: torch.Tensor) -> None:
            super().backward(loss)  # type: ignore[misc]

    class OtherScaler(AddOn):
        trainer_mixin = _Other

    with pytest.raises(AddOnDefinitionError, match="both override backward"):
        TinyTrainer.add_on(ZeroLoss, OtherScaler)

    class DeclaredScaler(AddOn):
        trainer_mixin = _Other
        runs_after = ("ZeroLoss",)

    assert TinyTrainer.add_on(DeclaredScaler, ZeroLoss).addons == (ZeroLoss, DeclaredScaler)


def test_strategy_outside_the_allowed_methods_or_without_super_is_rejected() -> None:
    class _Loop:
        def run_epoch(self, loader: Any) -> None:
            super().run_epoch(loader)  # type: ignore[misc]

    class Outside(AddOn):
        trainer_mixin = _Loop

    with pytest.raises(AddOnDefinitionError, match="may only override"):
        TinyTrainer.add_on(Outside)

    class _NoSuper:
        def backward(self, loss: torch.Tensor) -> None:
            loss.backward()

    class Hiding(AddOn):
        trainer_mixin = _NoSuper

    with pytest.raises(AddOnDefinitionError, match="does not call super"):
        TinyTrainer.add_on(Hiding)


def test_two_addons_exporting_one_name_are_rejected() -> None:
    class AlsoAlpha(AddOn):
        exports = ("alpha_value",)

        def alpha_value(self) -> int:
            return 0

    with pytest.raises(AddOnDefinitionError, match="both export alpha_value"):
        TinyTrainer.add_on(Alpha, AlsoAlpha)


def test_addon_state_is_namespaced_in_the_trainer_state_dict_and_restored() -> None:
    trainer = tiny_trainer(TinyTrainer.add_on(Alpha, Beta), needed=1.0)
    trainer.run(2, tiny_loader())
    state = trainer.state_dict()
    assert state["addons"] == {"Alpha": {"epochs": 2}}  # Beta keeps no state
    fresh = tiny_trainer(TinyTrainer.add_on(Alpha, Beta), needed=1.0)
    fresh.load_state_dict(state)
    assert fresh.get_addon(Alpha).epochs == 2 and fresh.progress_checker.epoch == 2


def test_zae_engine_style_addonbase_apply_still_works() -> None:
    class Greeting(AddOnBase):
        @classmethod
        def apply(cls, base_cls: type) -> type:
            class WithGreeting(base_cls):  # type: ignore[misc, valid-type]
                def greet(self) -> str:
                    return f"hello from {type(self).__name__}"

            return WithGreeting

    built = TinyTrainer.add_on(Greeting, Alpha)
    trainer = tiny_trainer(built)
    assert trainer.greet() == "hello from WithGreeting" and trainer.alpha_value() == 1
    assert Greeting in built.addons and Alpha in built.addons


def test_unknown_addon_name_lists_known_names() -> None:
    with pytest.raises(KeyError, match="no add-on named 'nope'"):
        TinyTrainer.add_on("nope")


def test_non_addon_argument_is_a_clear_error() -> None:
    with pytest.raises(AddOnDefinitionError, match="expected an AddOn subclass"):
        Trainer.add_on(42)


# -- pickling: built classes are rebuilt from base + add-ons (what spawned workers need) ----

PicklableBuilt = TinyTrainer.add_on(Alpha(alpha=5), Beta)


def test_built_class_pickles_by_rebuilding_it() -> None:
    clone = pickle.loads(pickle.dumps(PicklableBuilt))
    assert clone.__name__ == PicklableBuilt.__name__ and clone.addons == PicklableBuilt.addons
    trainer = tiny_trainer(clone, needed=3.0)
    assert trainer.get_addon(Alpha).alpha == 5  # the configured instance's settings survive


def test_user_subclass_of_a_built_class_pickles_by_reference() -> None:
    assert pickle.loads(pickle.dumps(_UserOfBuilt)) is _UserOfBuilt


class _UserOfBuilt(TinyTrainer.add_on(Alpha)):
    pass


def _train_in_child(built: type, queue: Any) -> None:
    trainer = tiny_trainer(built, needed=1.0)
    trainer.run(1, tiny_loader())
    queue.put((type(trainer).__name__, trainer.get_addon(Alpha).alpha, trainer.get_addon(Alpha).epochs))


@pytest.mark.slow
def test_built_class_is_rebuilt_in_a_spawned_process() -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_train_in_child, args=(PicklableBuilt, queue))
    proc.start()
    try:
        name, alpha, epochs = queue.get(timeout=60)
    finally:
        proc.join(timeout=30)
        with contextlib.suppress(Exception):
            proc.kill()
    assert (name, alpha, epochs) == ("TinyTrainer[Alpha, Beta]", 5, 1)
    assert proc.exitcode == 0
