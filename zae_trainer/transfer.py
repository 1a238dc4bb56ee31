"""Devices: resolving what the user asked for, and moving batches there.

Batches are moved recursively through tuples, lists, dicts, namedtuples and dataclasses;
only tensors move, everything else is returned as is. A copy is ``non_blocking`` only from
pinned memory, where it is safe and useful.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence, Union

import torch

__all__ = ["DeviceLike", "resolve_devices", "move_to_device"]

DeviceLike = Union[str, torch.device, int, None, Sequence[Union[str, torch.device, int]]]


def _one(device: str | torch.device | int) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if isinstance(device, int):
        return torch.device("cuda", device)
    if isinstance(device, str):
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"device {device!r} is not a device PyTorch knows ({exc}); use 'cpu', 'cuda', 'cuda:1', "
                "'auto', a torch.device, or a list of those"
            ) from None
    raise TypeError(f"device must be a str, int or torch.device, got {type(device).__name__}: {device!r}")


def resolve_devices(device: DeviceLike) -> list[torch.device]:
    """The list of devices to use; ``None`` / ``"auto"`` means CUDA if available, else CPU.

    Raises ``ValueError`` when CUDA is asked for but not available, naming what is.
    """
    items = [device] if device is None or isinstance(device, (str, torch.device, int)) else list(device)
    if not items:
        raise ValueError("device list is empty; give at least one device, or None for automatic choice")
    devices = [_one("auto" if d is None else d) for d in items]
    for d in devices:
        if d.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = d.index if d.index is not None else 0
            if index >= count:
                raise ValueError(
                    f"device {d} was requested but this machine has {count} CUDA device(s); "
                    "use device='cpu' or device=None (automatic)"
                )
    return devices


def move_to_device(obj: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Return ``obj`` with every tensor inside moved to ``device``, keeping its structure."""
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        return obj.to(device, non_blocking=non_blocking and obj.is_pinned())
    if type(obj) is tuple:  # the common (inputs, targets) batch, kept cheap
        return tuple(
            [
                v if type(v) is torch.Tensor and v.device == device else move_to_device(v, device, non_blocking)
                for v in obj
            ]
        )
    if isinstance(obj, dict):
        moved_items = {k: move_to_device(v, device, non_blocking) for k, v in obj.items()}
        if type(obj) is dict:
            return moved_items
        out = copy.copy(obj)  # dict subclasses (OrderedDict, defaultdict) keep their type
        out.update(moved_items)
        return out
    if isinstance(obj, tuple):
        moved = [move_to_device(v, device, non_blocking) for v in obj]
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*moved)
        return tuple(moved) if type(obj) is tuple else type(obj)(moved)
    if isinstance(obj, list):
        return [move_to_device(v, device, non_blocking) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {
            f.name: move_to_device(getattr(obj, f.name), device, non_blocking)
            for f in dataclasses.fields(obj)
            if f.init
        }
        return dataclasses.replace(obj, **changes)
    return obj
