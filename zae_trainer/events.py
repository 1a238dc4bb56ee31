"""The lifecycle events the core loop emits, in the order it emits them.

Where every event fires, as the loop runs (``run(n_epoch, loader, valid_loader)``)::

    RUN_BEGIN
    for epoch in epochs:
        EPOCH_BEGIN
        for batch in loader:                    # training
            TRAIN_BATCH_BEGIN
            outputs = train_step(batch)
            BEFORE_BACKWARD
            backward(loss / accumulate_grad_batches)
            AFTER_BACKWARD
            if this batch closes an accumulation group:
                BEFORE_OPTIMIZER_STEP           # unscale, clip, guard; may raise SkipStep
                optimizer_step()
                progress_checker.step += 1
                AFTER_OPTIMIZER_STEP            # not fired for a skipped step
                per-batch scheduler step (if stepped); zero_grad()
            TRAIN_BATCH_END
            every log_every_n_steps optimizer steps:  LOG(metrics)
        LOG(metrics of the batches since the last log point), if any
        if validation is due:
            VALID_BEGIN
            for batch in valid_loader:
                outputs = test_step(batch)
                VALID_BATCH_END
            VALID_END
        epoch metrics reduced (across processes under DDP); best tracked; per-epoch scheduler step;
        progress_checker.epoch += 1
        EPOCH_END                               # trainer.epoch_metrics is final here
        if stop requested: break
    RUN_END                                     # always, also after EXCEPTION / INTERRUPT

    raised anywhere inside run():   EXCEPTION(exc), RUN_END, then the error propagates unchanged
    SIGINT / SIGTERM during run():  at the next batch boundary INTERRUPT(signum), RUN_END, then
                                    KeyboardInterrupt (exit 130) / TrainingTerminated (exit 143)
    a checkpoint is written / read: CHECKPOINT_SAVE(checkpoint) / CHECKPOINT_LOAD(checkpoint)

    trainer.test(loader, weights) (outside run()): VALID_BATCH_END after each test batch (the
                                    evaluation-batch event, as in a mode="test" run), then
                                    TEST_END(metrics) with the ``test/*`` means; no run, epoch or
                                    checkpoint event fires, so training history, progress and
                                    the run's summary stay as they were

Why end-events do not fire when a phase raises: an end-event promises the phase finished
(EPOCH_END means "this epoch's metrics are final", so checkpoints and early stopping act on
it). A phase that raised did not finish, so its subscribers hear EXCEPTION instead, and
RUN_END always fires so loggers and files are closed. A phase cancelled on purpose
(``trainer.request_stop``, ``SkipStep``) did finish, and gets its end-event.

Ordering: begin-type events call add-ons in their declared order; end-type events
(``*_END``, ``AFTER_*``) call them in reverse, so the add-on that opens a phase first closes
it last (see :func:`Event.is_reversed`).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["Event", "HOOK_PREFIX", "EVENT_ARGUMENTS"]

HOOK_PREFIX: Final = "on_"


class Event(str, enum.Enum):
    """One lifecycle event. Its value is the name of the hook method that handles it.

    An add-on subscribes by defining a method named after the event's value, for example
    ``def on_epoch_end(self, trainer): ...``. Extra positional arguments a hook receives
    are listed in :data:`EVENT_ARGUMENTS`.
    """

    RUN_BEGIN = "on_run_begin"
    EPOCH_BEGIN = "on_epoch_begin"
    TRAIN_BATCH_BEGIN = "on_train_batch_begin"
    BEFORE_BACKWARD = "on_before_backward"
    AFTER_BACKWARD = "on_after_backward"
    BEFORE_OPTIMIZER_STEP = "on_before_optimizer_step"
    AFTER_OPTIMIZER_STEP = "on_after_optimizer_step"
    TRAIN_BATCH_END = "on_train_batch_end"
    VALID_BEGIN = "on_valid_begin"
    VALID_BATCH_END = "on_valid_batch_end"
    VALID_END = "on_valid_end"
    EPOCH_END = "on_epoch_end"
    LOG = "on_log"
    RUN_END = "on_run_end"
    EXCEPTION = "on_exception"
    INTERRUPT = "on_interrupt"
    CHECKPOINT_SAVE = "on_checkpoint_save"
    CHECKPOINT_LOAD = "on_checkpoint_load"
    TEST_END = "on_test_end"

    @property
    def hook_name(self) -> str:
        """The method name an add-on defines to handle this event."""
        return self.value

    @property
    def is_reversed(self) -> bool:
        """End-type events call add-ons in reverse declared order."""
        return self.name.endswith("_END") or self.name.startswith("AFTER_")

    @classmethod
    def from_hook_name(cls, name: str) -> "Event":
        """The event handled by a hook method called ``name``; ``ValueError`` if none."""
        return cls(name)

    def __str__(self) -> str:  # "Event.EPOCH_END" reads better in messages than the value
        return f"Event.{self.name}"


#: Positional arguments a hook receives after ``trainer``, by event. Hooks of events not
#: listed here take ``(self, trainer)`` only.
EVENT_ARGUMENTS: Final[dict[Event, tuple[str, ...]]] = {
    Event.LOG: ("metrics",),
    Event.EXCEPTION: ("exception",),
    Event.INTERRUPT: ("signum",),
    Event.CHECKPOINT_SAVE: ("checkpoint",),
    Event.CHECKPOINT_LOAD: ("checkpoint",),
    Event.TEST_END: ("metrics",),
}

HOOK_NAMES: Final[frozenset[str]] = frozenset(e.value for e in Event)
