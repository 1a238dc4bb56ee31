"""Copying a ``DataLoader``'s settings onto a rebuilt loader.

Two add-ons rebuild a user's loader with a different sampler: the distributed add-ons (a
``DistributedSampler`` shard) and the state manager (a mid-epoch resume that skips the
batches already trained on). Both must keep everything else the user chose — workers,
collate function, pinned memory, generator — or a resumed or distributed run would quietly
load data differently. This module is the one place that knows those settings.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

__all__ = ["loading_settings"]


def loading_settings(loader: DataLoader) -> dict[str, Any]:  # type: ignore[type-arg]
    """``DataLoader`` keywords for how ``loader`` loads, leaving out how it samples.

    The result holds workers, collate function, pinned memory, timeout, worker init,
    multiprocessing context, generator and persistence; not the dataset, batch size,
    sampler, shuffle or ``drop_last``, which the caller decides.
    """
    settings: dict[str, Any] = dict(
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        settings["prefetch_factor"] = loader.prefetch_factor
    if getattr(loader, "pin_memory_device", ""):
        settings["pin_memory_device"] = loader.pin_memory_device
    if hasattr(loader, "in_order"):
        settings["in_order"] = loader.in_order
    return settings
