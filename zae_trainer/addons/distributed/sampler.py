"""Giving each process its share of the data, with the user's loader settings kept.

Training loaders get a :class:`~torch.utils.data.DistributedSampler`: it pads the data set
(repeating a few samples) so that every rank runs the same number of batches, which DDP's
gradient all-reduce requires. Validation loaders get :class:`UnpaddedDistributedSampler`:
evaluation has no collective per batch, so ranks may run different numbers of batches, and
every sample is then evaluated exactly once — the all-reduced ``valid/*`` metrics equal a
single-process evaluation.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from ...errors import TrainerConfigError
from .._loader_copy import loading_settings

__all__ = ["UnpaddedDistributedSampler", "distribute_loader", "distributed_sampler_of"]


class UnpaddedDistributedSampler(DistributedSampler):  # type: ignore[type-arg]
    """Rank ``r`` of ``n`` gets samples ``r, r + n, r + 2n, ...``: no padding, no duplicates.

    Shards differ in length by at most one sample. Use it for evaluation only: in training,
    ranks with fewer batches would leave DDP's all-reduce waiting.
    """

    def __iter__(self) -> Iterator[int]:
        total = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(total, generator=g).tolist()
        else:
            order = list(range(total))
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]


def distributed_sampler_of(loader: Any) -> DistributedSampler | None:  # type: ignore[type-arg]
    """The ``DistributedSampler`` a loader draws from (directly or through its batch sampler)."""
    for candidate in (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        if isinstance(candidate, DistributedSampler):
            return candidate
    return None


def _shuffles(loader: DataLoader) -> bool:  # type: ignore[type-arg]
    sampler = loader.sampler
    if isinstance(sampler, SequentialSampler):
        return False
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler._num_samples is not None:
            raise TrainerConfigError(
                "the loader samples with replacement or a fixed num_samples (RandomSampler(replacement=True, "
                "num_samples=...)), which a DistributedSampler cannot reproduce. To fix, build the loader "
                "with a sampler that shards by rank yourself (trainer.world_size, torch.distributed.get_rank())."
            )
        return True
    raise TrainerConfigError(
        f"the loader uses a custom sampler ({type(sampler).__name__}); MultiGPUAddon only replaces the default "
        "sequential and shuffling samplers. To fix, give each process its shard yourself, e.g. wrap your sampler "
        "so that rank r takes every world_size-th index, or pass sampler=DistributedSampler(dataset)."
    )


def _seed(loader: DataLoader, default: int) -> int:  # type: ignore[type-arg]
    """The shuffling seed every rank agrees on: the loader's generator seed, else ``default``."""
    generator = getattr(loader.sampler, "generator", None) or loader.generator
    if isinstance(generator, torch.Generator):
        return int(generator.initial_seed()) % (2**63)
    return default


def distribute_loader(loader: Any, *, rank: int, world_size: int, train: bool, seed: int = 0) -> Any:
    """A copy of ``loader`` that yields only this rank's share of the data.

    Kept from the user's loader: batch size, ``collate_fn``, workers and their options,
    ``pin_memory``, ``drop_last``, ``timeout``, ``generator``; shuffling becomes the sampler's
    ``shuffle``, reseeded every epoch through ``set_epoch``, with the loader's generator seed
    (``seed`` when it has none). A loader that already holds a ``DistributedSampler`` and
    anything that is not a ``DataLoader`` are returned unchanged.
    """
    if not isinstance(loader, DataLoader) or distributed_sampler_of(loader) is not None:
        return loader
    if isinstance(loader.dataset, IterableDataset):
        warnings.warn(
            "an IterableDataset cannot be given a DistributedSampler: every process will read the whole "
            "stream unless the dataset shards itself by rank (torch.distributed.get_rank()).",
            RuntimeWarning,
            stacklevel=3,
        )
        return loader
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
        raise TrainerConfigError(
            f"the loader uses a custom batch_sampler ({type(loader.batch_sampler).__name__}), which MultiGPUAddon "
            "cannot shard without changing its batches. To fix, make the batch sampler draw from a "
            "DistributedSampler (or UnpaddedDistributedSampler for evaluation)."
        )
    size = len(loader.dataset)  # type: ignore[arg-type]
    if not train and size < world_size:
        raise TrainerConfigError(
            f"the validation set has {size} sample(s) for {world_size} processes, so some would evaluate "
            "nothing. To fix, use a validation set at least as large as the number of processes."
        )
    sampler_cls: type[DistributedSampler] = DistributedSampler if train else UnpaddedDistributedSampler  # type: ignore[type-arg]
    sampler = sampler_cls(
        loader.dataset, num_replicas=world_size, rank=rank, shuffle=_shuffles(loader), seed=_seed(loader, seed)
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        drop_last=loader.drop_last,
        **loading_settings(loader),
    )
