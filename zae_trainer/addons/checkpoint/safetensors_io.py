"""Tensor dicts to and from ``.safetensors`` files, shared (tied) weights included.

Files are written by the library itself (``safetensors.torch.save_file``, which writes from
each tensor's memory without an intermediate ``bytes`` copy of the model) and read back with
``safetensors.torch.load_file``, so what we write is by construction what other safetensors
tools read. What we add around the library call: the crash-safe publication (the caller
hands us a temporary path in the destination folder, then fsyncs and renames it, see
:mod:`.atomic`) and shared storage.

Shared storage: ``save_file`` refuses tensors that share memory (tied input/output
embeddings). We store each shared tensor once, under its first name, and list the other
names in the header metadata (``zae_trainer.aliases``); :func:`read_tensors` restores them.
Other tools see the unique tensors, as with ``safetensors.torch.save_model``. Distinct views
into one storage (not the same tensor) are copied apart before the call.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch

from .errors import CheckpointCorruptError

__all__ = ["write_tensors", "read_tensors", "ALIASES_KEY"]

ALIASES_KEY = "zae_trainer.aliases"

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    """Tensors with equal identity are the same view of the same memory (a tied weight)."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _unique(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split into unique tensors and ``alias -> stored name`` for tied ones."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in _DTYPES:
            raise TypeError(
                f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store. To fix, convert it, "
                "or use save_format='ckpt'."
            )
        key = _identity(tensor)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor
    return unique, aliases


def _separate(unique: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing storage with another (what ``save_file`` accepts)."""
    owners: dict[tuple[Any, ...], str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in unique.items():
        flat = tensor.detach().to("cpu")
        flat = flat if flat.is_contiguous() else flat.contiguous()
        if flat.numel():
            storage = (flat.untyped_storage().data_ptr(), flat.untyped_storage().nbytes())
            if storage in owners:  # a different view into memory another tensor uses
                flat = flat.clone()
            else:
                owners[storage] = name
        out[name] = flat
    return out


def write_tensors(
    path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` to the file ``path`` in safetensors format, with ``safetensors.torch.save_file``.

    ``path`` should be a temporary name: publish it with :func:`.atomic.write_path_atomic`.
    """
    from safetensors.torch import save_file

    unique, aliases = _unique(tensors)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    save_file(_separate(unique), path, metadata=meta or None)


def read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a ``.safetensors`` file (tensors on the CPU) and re-create tied names."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(path, device="cpu")
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers / sizes
        raise CheckpointCorruptError(
            f"{path!r} is not a readable safetensors file ({type(exc).__name__}: {exc}). It may be truncated "
            "by an interrupted copy; use an earlier checkpoint.",
            path,
        ) from exc
    aliases = json.loads(metadata.pop(ALIASES_KEY, "{}"))
    for alias, stored in aliases.items():
        if stored not in tensors:
            raise CheckpointCorruptError(f"{path!r}: tied tensor {alias!r} points at missing {stored!r}", path)
        tensors[alias] = tensors[stored]
    return tensors, metadata
