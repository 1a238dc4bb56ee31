"""Where the data stream was: enough to continue an epoch at the exact next batch.

A shuffling ``DataLoader`` draws its order when its iterator starts: the iterator's base
seed, then the sampler's permutation, from the global torch generator (or from the
loader's ``generator``). So the state manager records, at ``EPOCH_BEGIN`` (before the loader
is iterated), the torch RNG state and the loaders' generator states. To resume at batch
``k`` of that epoch it puts those states back, starts a loader whose batch sampler first
drops ``k`` batches of *indices* (no sample is loaded), and then restores the RNG state of
the moment the checkpoint was taken, so dropout and the rest continue exactly.

A loader with its own ``state_dict`` (torchdata's ``StatefulDataLoader``) is asked for its
state instead and restored with ``load_state_dict``.

Loaders that are not a plain map-style ``DataLoader`` fall back to fetching and discarding
the consumed batches (the core's behaviour) with the epoch-start RNG put back first, which
is exact unless fetching itself draws random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from .._loader_copy import loading_settings

__all__ = ["ResumePlan", "capture_epoch_start", "generator_states", "set_generator_states", "is_stateful_loader",
           "SkipBatches", "fast_forward"]


def is_stateful_loader(loader: Any) -> bool:
    """Whether ``loader`` saves and restores its own position (``StatefulDataLoader``)."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def _generators(loader: Any) -> dict[str, torch.Generator]:
    found: dict[str, torch.Generator] = {}
    seen: set[int] = set()
    candidates = (
        ("loader.generator", getattr(loader, "generator", None)),
        ("sampler.generator", getattr(getattr(loader, "sampler", None), "generator", None)),
        ("batch_sampler.sampler.generator",
         getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None)),
    )
    for label, gen in candidates:
        if isinstance(gen, torch.Generator) and id(gen) not in seen:
            seen.add(id(gen))
            found[label] = gen
    return found


def generator_states(loader: Any) -> dict[str, torch.Tensor]:
    """States of the generators a loader and its samplers own (empty if none)."""
    return {label: gen.get_state() for label, gen in _generators(loader).items()}


def set_generator_states(loader: Any, states: dict[str, torch.Tensor]) -> None:
    gens = _generators(loader)
    for label, state in states.items():
        if label in gens:
            gens[label].set_state(state.to(torch.uint8))


def capture_epoch_start(loader: Any) -> dict[str, Any]:
    """What decides this epoch's order: the torch RNG and the loader's generators, now."""
    return {"torch": torch.get_rng_state(), "generators": generator_states(loader)}


@dataclass
class ResumePlan:
    """A loaded checkpoint's data position, waiting for the loader to be iterated."""

    batch_in_epoch: int
    epoch_start: dict[str, Any] | None
    generators: dict[str, torch.Tensor] = field(default_factory=dict)
    loader_state: Any = None


class SkipBatches:
    """A batch sampler (or sampler) that drops its first ``skip`` items, then calls ``on_skipped``."""

    def __init__(self, inner: Iterable[Any], skip: int, on_skipped: Callable[[], None]) -> None:
        self.inner = inner
        self.skip = skip
        self.on_skipped = on_skipped

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.inner)
        for _ in range(self.skip):
            if next(it, _END) is _END:
                break
        self.on_skipped()
        yield from it

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)  # type: ignore[arg-type]


_END = object()


def _rebuild_skipping(loader: DataLoader, skip: int, on_skipped: Callable[[], None]) -> DataLoader:
    """A one-epoch copy of ``loader`` whose batch sampler skips ``skip`` batches of indices."""
    kwargs = loading_settings(loader)
    kwargs["persistent_workers"] = False  # a one-epoch copy: its workers should end with it
    if loader.batch_sampler is not None:
        kwargs["batch_sampler"] = SkipBatches(loader.batch_sampler, skip, on_skipped)
    else:
        kwargs.update(batch_size=None, sampler=SkipBatches(loader.sampler, skip, on_skipped))
    return DataLoader(loader.dataset, **kwargs)


def _after_iter(loader: Any, restore: Callable[[], None]) -> Iterator[Any]:
    iterator = iter(loader)
    restore()
    yield from iterator


def fast_forward(
    loader: Any, plan: ResumePlan, fallback: Callable[[Any, int], Iterable[Any]]
) -> Iterable[Any]:
    """Iterate ``loader`` from batch ``plan.batch_in_epoch`` with this epoch's original order.

    Call with the global RNG already restored to the checkpoint's state; that state is what
    the first trained batch sees.
    """
    rng_at_checkpoint = torch.get_rng_state()

    def restore() -> None:
        torch.set_rng_state(rng_at_checkpoint)

    if is_stateful_loader(loader):
        if not plan.batch_in_epoch:
            # At an epoch boundary the loader starts a new epoch exactly as the original run's
            # did; its generators were put back at EPOCH_BEGIN. Loading its finished-epoch state
            # would make starting the iterator draw differently from the global RNG.
            return loader
        if plan.loader_state is not None:
            loader.load_state_dict(plan.loader_state)
        # The original run drew this epoch's seeds before the checkpoint: whatever starting
        # the resumed iterator draws must not shift the RNG the next step sees.
        return _after_iter(loader, restore)
    consumed = plan.batch_in_epoch
    if consumed == 0:
        return loader
    if plan.epoch_start is not None:
        torch.set_rng_state(plan.epoch_start["torch"].to(torch.uint8))
        set_generator_states(loader, plan.epoch_start.get("generators", {}))
    if type(loader) is DataLoader and not isinstance(loader.dataset, IterableDataset):
        return _rebuild_skipping(loader, consumed, restore)
    remaining = fallback(loader, consumed)  # fetches and discards, eagerly
    restore()
    return remaining
