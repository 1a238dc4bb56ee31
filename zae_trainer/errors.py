"""Exceptions the core defines: control flow for add-ons, and errors that teach.

Control flow between add-ons goes through these explicit types (and
``Trainer.request_stop``), never through flags other add-ons must know about.
"""

from __future__ import annotations

__all__ = [
    "SkipStep",
    "AddOnDefinitionError",
    "AddOnHookError",
    "TrainerConfigError",
    "StepOutputError",
    "NonFiniteLossError",
    "TrainingTerminated",
]


class SkipStep(Exception):
    """Raise from a ``BEFORE_OPTIMIZER_STEP`` hook to skip this optimizer step.

    The gradients are discarded, the optimizer and per-batch scheduler do not step,
    ``AFTER_OPTIMIZER_STEP`` does not fire, and ``trainer.progress_checker.skipped_steps``
    counts it. ``TRAIN_BATCH_END`` still fires: the batch was handled.
    """

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class AddOnDefinitionError(TypeError):
    """An add-on, or a combination of add-ons, cannot form a trainer class.

    Raised when the class is built (``Trainer.add_on``), never later: a misspelt hook,
    a duplicate or conflicting add-on, a strategy override outside the allowed set,
    an ordering cycle.
    """


class AddOnHookError(RuntimeError):
    """No longer raised by the core; kept so that code importing it keeps importing.

    Exceptions raised inside an add-on's hook now leave ``emit`` with their own type
    (``except FileNotFoundError`` or ``except NonFiniteLossError`` catch what the docs say is
    raised). Where they came from is attached as an exception note, shown in the traceback::

        NonFiniteLossError: non-finite loss at step 7 ...
        raised by add-on 'nonfinite_guard' while handling Event.TRAIN_BATCH_END

    To find the add-on programmatically, read ``exc.__notes__``.

    Attributes
    ----------
    addon_name : str
        The add-on whose hook raised.
    event : Event
        The event being dispatched.
    """

    def __init__(self, addon_name: str, event: object, original: BaseException) -> None:
        super().__init__(
            f"add-on {addon_name!r} raised {type(original).__name__} while handling {event}: {original}"
        )
        self.addon_name = addon_name
        self.event = event
        self.original = original


class TrainerConfigError(ValueError):
    """A trainer setting or a ``run()`` argument is invalid; the message says how to fix it."""


class StepOutputError(TypeError):
    """``train_step`` / ``test_step`` returned something the loop cannot use."""


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or infinite. ``step`` is the 1-based global step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class TrainingTerminated(SystemExit):
    """SIGTERM stopped ``run()`` at a batch boundary; exits with code 143 (``128 + SIGTERM``).

    A ``SystemExit``, so an unhandled one ends the process with the conventional code after
    ``finally`` blocks and ``RUN_END`` hooks have run.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.exit_code = 128 + signum
