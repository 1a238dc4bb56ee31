"""Devices: resolving what the user asked for, and moving batches there.

Automatic choice
----------------
``device=None`` (or ``"auto"``) takes the first accelerator PyTorch reports as available, in
this order: CUDA (also ROCm builds, which answer to ``cuda``), Apple's MPS, Intel's XPU, and
the CPU when there is none. The order is the one users expect from PyTorch itself: CUDA is
the most complete backend, MPS and XPU each exist on one vendor's machines only, so at most
one of them is normally present. Pass a device explicitly to choose otherwise.

Batches
-------
:func:`move_to_device` moves every tensor inside a batch and keeps the batch's shape and
types: tuples, lists, namedtuples, dataclasses, and any :class:`~collections.abc.Mapping`
(``dict`` and its subclasses, ``UserDict``, a tokenizer's ``BatchEncoding``). An object that
is none of these but has a ``.to()`` method (a graph batch, a custom batch class) is moved by
calling ``obj.to(device)``; so is a tuple type with its own ``.to()``, such as a
``PackedSequence``, which knows that its ``batch_sizes`` stay on the CPU. Everything else (strings, numbers, ``None``) is returned as it is.
A copy is ``non_blocking`` only from pinned memory, where it is safe and useful.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, MutableMapping
from typing import Any, Callable, Sequence, Union

import torch

__all__ = ["DeviceLike", "resolve_devices", "auto_device", "move_to_device"]

_CPU = torch.device("cpu")

DeviceLike = Union[str, torch.device, int, None, Sequence[Union[str, torch.device, int]]]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _xpu_available() -> bool:
    xpu = getattr(torch, "xpu", None)  # torch.xpu appeared in torch 2.4 builds
    return bool(xpu is not None and xpu.is_available())


#: The automatic choice, in order of preference: (device type, availability check).
_AUTO_ORDER: tuple[tuple[str, Callable[[], bool]], ...] = (
    ("cuda", lambda: torch.cuda.is_available()),
    ("mps", _mps_available),
    ("xpu", _xpu_available),
)


def auto_device() -> torch.device:
    """The device ``device=None`` means here: CUDA, else MPS, else XPU, else the CPU.

    Examples
    --------
    >>> auto_device().type in ("cuda", "mps", "xpu", "cpu")
    True
    """
    for kind, available in _AUTO_ORDER:
        if available():
            return torch.device(kind)
    return torch.device("cpu")


def _available_count(kind: str) -> int:
    """How many devices of ``kind`` this machine has (0 for a type it lacks)."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        return 1 if _mps_available() else 0
    if kind == "xpu":
        return torch.xpu.device_count() if _xpu_available() else 0
    raise ValueError(kind)


def _one(device: str | torch.device | int) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if isinstance(device, int):
        return torch.device("cuda", device)
    if isinstance(device, str):
        if device == "auto":
            return auto_device()
        try:
            return torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"device {device!r} is not a device PyTorch knows ({exc}); use 'cpu', 'cuda', 'cuda:1', "
                "'mps', 'xpu', 'auto', a torch.device, or a list of those"
            ) from None
    raise TypeError(f"device must be a str, int or torch.device, got {type(device).__name__}: {device!r}")


def resolve_devices(device: DeviceLike) -> list[torch.device]:
    """The list of devices to use; ``None`` / ``"auto"`` means :func:`auto_device`.

    Raises ``ValueError`` when a CUDA, MPS or XPU device is asked for that this machine does
    not have, naming how many it has.

    Examples
    --------
    >>> resolve_devices("cpu")
    [device(type='cpu')]
    """
    items = [device] if device is None or isinstance(device, (str, torch.device, int)) else list(device)
    if not items:
        raise ValueError("device list is empty; give at least one device, or None for automatic choice")
    devices = [_one("auto" if d is None else d) for d in items]
    for d in devices:
        if d.type in ("cuda", "mps", "xpu"):
            count = _available_count(d.type)
            index = d.index if d.index is not None else 0
            if index >= count:
                raise ValueError(
                    f"device {d} was requested but this machine has {count} {d.type.upper()} device(s); "
                    f"use device='cpu', or device=None to pick automatically (here: {auto_device()})"
                )
    return devices


def move_to_device(obj: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Return ``obj`` with every tensor inside moved to ``device``, keeping its structure.

    The input is not modified. Mappings keep their type (a mutable one is shallow-copied and
    its values replaced, so extra attributes such as a ``BatchEncoding``'s encodings survive;
    a read-only one is rebuilt with ``type(obj)(dict)``, or becomes a ``dict`` when its type
    cannot be built that way). Objects with a ``.to()`` method are moved with ``obj.to(device)``.

    Examples
    --------
    >>> from collections import UserDict
    >>> batch = UserDict(x=torch.ones(2))
    >>> moved = move_to_device(batch, torch.device("meta"))
    >>> type(moved).__name__, moved["x"].device.type
    ('UserDict', 'meta')
    """
    if type(obj) is tuple:  # the common (inputs, targets) batch, first and kept cheap (once per step)
        # Already where it belongs (CPU training, a loader that moves): the same tuple. On the
        # CPU, ``is_cpu`` answers without building a device object per tensor, and testing
        # for a tuple before ``isinstance(obj, Tensor)`` (slow for what is not a tensor)
        # saves as much again: ~3,000 instructions per batch together.
        on_cpu = device == _CPU
        for v in obj:
            if type(v) is not torch.Tensor or not (v.is_cpu if on_cpu else v.device == device):
                break
        else:
            return obj
        return tuple(
            [
                v if type(v) is torch.Tensor and v.device == device else move_to_device(v, device, non_blocking)
                for v in obj
            ]
        )
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        return obj.to(device, non_blocking=non_blocking and obj.is_pinned())
    if isinstance(obj, Mapping):
        moved_items = {k: move_to_device(v, device, non_blocking) for k, v in obj.items()}
        if type(obj) is dict:
            return moved_items
        return _rebuild_mapping(obj, moved_items)
    if isinstance(obj, tuple):
        if callable(getattr(obj, "to", None)):  # a tuple type that knows what moves (PackedSequence)
            return _move_with_to(obj, device)
        moved = [move_to_device(v, device, non_blocking) for v in obj]
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*moved)
        return type(obj)(moved)
    if isinstance(obj, list):
        return [move_to_device(v, device, non_blocking) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {
            f.name: move_to_device(getattr(obj, f.name), device, non_blocking)
            for f in dataclasses.fields(obj)
            if f.init
        }
        return dataclasses.replace(obj, **changes)
    if obj is None or isinstance(obj, (str, bytes, int, float, complex, type)):
        return obj
    if callable(getattr(obj, "to", None)):
        return _move_with_to(obj, device)
    return obj


def _move_with_to(obj: Any, device: torch.device) -> Any:
    """``obj.to(device)``, or ``obj`` itself when its ``.to()`` works in place and returns nothing."""
    try:
        moved = obj.to(device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"the batch holds a {type(obj).__qualname__} whose .to({str(device)!r}) failed: {exc}. "
            "Batches are moved by calling .to(device) on objects that have it. To fix, give the class a "
            ".to(device) that moves its tensors, or return tensors (in tuples, dicts or dataclasses) "
            "from the DataLoader's collate_fn."
        ) from exc
    return obj if moved is None else moved


def _rebuild_mapping(obj: Mapping[Any, Any], moved_items: dict[Any, Any]) -> Mapping[Any, Any]:
    """A mapping of ``obj``'s type holding ``moved_items``."""
    if isinstance(obj, MutableMapping):
        try:
            out = copy.copy(obj)  # OrderedDict, defaultdict, UserDict, BatchEncoding keep type and attributes
        except Exception:  # a type copy cannot handle: fall through to rebuilding it
            pass
        else:
            for key, value in moved_items.items():
                out[key] = value
            return out
    try:
        return type(obj)(moved_items)  # type: ignore[call-arg]
    except Exception:
        return moved_items
