"""What a checkpoint may hold, and how the non-tensor part becomes JSON.

A checkpoint is a tree of dicts, lists and tuples whose leaves are tensors and plain values
(``str``, ``int``, ``float``, ``bool``, ``None``). :func:`to_plain` checks a tree when it is
*saved* and says where an unsupported object sits, so a checkpoint can never be written that
safe loading (``weights_only=True``, or JSON) would later refuse.

For the safetensors format, :func:`split` moves tensors out of the tree into named buckets
and leaves JSON behind; tuples, non-string dict keys and non-finite floats get small tagged
objects so :func:`join` gives back exactly what was saved.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch

__all__ = ["to_plain", "split", "join", "TAG"]

TAG = "__zt__"
_SCALARS = (str, int, float, bool, type(None))
#: the exact types that pass as they are (a set: one hash lookup per value)
_LEAVES = frozenset({*_SCALARS, torch.Tensor})


class _NotPlain(Exception):
    """Raised by :func:`_plain` at the first unsupported value, which it carries."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value


def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """Return ``obj`` with numpy scalars/arrays and paths converted; raise on anything else.

    It runs at every checkpoint save over the whole non-model tree, so the walk builds no
    key paths: only when a value is refused is the tree searched for where it sits.

    Raises
    ------
    TypeError
        Naming the key path of the first unsupported value and how to fix it.
    """
    try:
        return _plain(obj)
    except _NotPlain as refused:
        kind = type(refused.value)
        path = _path_to(obj, refused.value)
        raise TypeError(
            f"{where}{path or ''} is a {kind.__module__}.{kind.__qualname__}; a checkpoint holds only tensors, "
            "numbers, strings, booleans, None, and lists/tuples/dicts of them, so that it loads without "
            "unpickling code. To fix, convert it (e.g. to a dict of numbers or a string) in the "
            "state_dict/config that produced it."
        ) from None


def _plain(obj: Any) -> Any:
    kind = type(obj)
    if kind in _LEAVES:  # the exact types a checkpoint is made of, first
        return obj
    # Containers test their leaves inline: most values are leaves, and a call per value
    # was most of the walk's cost (it runs over the optimizer state at every save).
    if kind is dict:
        return {k: v if type(v) in _LEAVES else _plain(v) for k, v in obj.items()}
    if kind is list:
        return [v if type(v) in _LEAVES else _plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (bool, int, float, str)):  # subclasses (TorchVersion, IntEnum) would need pickling
        return next(t for t in (bool, int, float, str) if isinstance(obj, t))(obj)
    if isinstance(obj, Mapping):
        if kind is OrderedDict:
            return OrderedDict((k, _plain(v)) for k, v in obj.items())
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, torch.Size):
        return tuple(obj)
    if isinstance(obj, tuple):
        return tuple([_plain(v) for v in obj])
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if kind.__module__ == "numpy":
        if hasattr(obj, "ndim") and getattr(obj, "ndim", 0) > 0:
            return torch.from_numpy(obj.copy())
        return obj.item()
    raise _NotPlain(obj)


def _path_to(tree: Any, target: Any) -> str | None:
    """The key path (``['a'][0]``) of ``target`` inside ``tree``, found by identity; None if absent."""
    if tree is target:
        return ""
    if isinstance(tree, Mapping):
        items: Any = ((repr(k), v) for k, v in tree.items())
    elif isinstance(tree, (list, tuple)) and not isinstance(tree, torch.Size):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return None
    for key, value in items:
        found = _path_to(value, target)
        if found is not None:
            return f"[{key}]{found}"
    return None


def split(obj: Any, bucket_of: Callable[[str], dict[str, torch.Tensor]], path: str = "") -> Any:
    """Replace tensors in ``obj`` by references; each tensor goes to ``bucket_of(path)``.

    The returned tree contains only JSON types.
    """
    if isinstance(obj, torch.Tensor):
        bucket = bucket_of(path)
        bucket[path] = obj
        return {TAG: "tensor", "key": path}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {TAG: "float", "value": repr(obj)}
    if isinstance(obj, tuple):
        return {TAG: "tuple", "items": [split(v, bucket_of, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split(v, bucket_of, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and TAG not in obj:
            return {k: split(v, bucket_of, f"{path}.{k}" if path else k) for k, v in obj.items()}
        return {
            TAG: "dict",
            "items": [[split(k, bucket_of, f"{path}.key{i}"), split(v, bucket_of, f"{path}.{k}")]
                      for i, (k, v) in enumerate(obj.items())],
        }
    raise TypeError(f"{path or 'checkpoint'}: cannot store a {type(obj).__name__} as JSON")


def join(tree: Any, tensor_for: Callable[[str], torch.Tensor]) -> Any:
    """Inverse of :func:`split`: rebuild the tree, fetching tensors by key."""
    if isinstance(tree, list):
        return [join(v, tensor_for) for v in tree]
    if not isinstance(tree, dict):
        return tree
    tag = tree.get(TAG)
    if tag is None:
        return {k: join(v, tensor_for) for k, v in tree.items()}
    if tag == "tensor":
        return tensor_for(tree["key"])
    if tag == "float":
        return float(tree["value"])
    if tag == "tuple":
        return tuple(join(v, tensor_for) for v in tree["items"])
    if tag == "dict":
        return {join(k, tensor_for): join(v, tensor_for) for k, v in tree["items"]}
    raise ValueError(f"unknown tagged value {tag!r} in checkpoint JSON")
