"""Tensor dicts to and from ``.safetensors`` files, shared (tied) weights included.

The file is written here, straight from each tensor's memory into the output file (no
intermediate ``bytes`` copy of the whole model), in the published safetensors layout: an
8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and
byte range, then the raw data. Files are read back with the official
``safetensors.torch.load_file``, so anything we write is, by construction, what other
safetensors tools read.

Shared storage: ``safetensors.torch.save_file`` refuses tensors that share memory (tied
input/output embeddings). We store each shared tensor once, under its first name, and list
the other names in the header metadata (``zae_trainer.aliases``); :func:`read_tensors`
restores them. Other tools see the unique tensors, as with ``safetensors.torch.save_model``.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Mapping

import torch

from .atomic import RecordingFile
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


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


def write_tensors(
    file: RecordingFile, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` to an open binary file in safetensors format."""
    unique, aliases = _unique(tensors)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    header: dict[str, Any] = {}
    offset = 0
    order = sorted(unique)
    for name in order:
        t = unique[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if meta:
        header["__metadata__"] = meta
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    file.write(struct.pack("<Q", len(encoded)))
    file.write(encoded)
    for name in order:
        file.write(_raw_bytes(unique[name]))


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
