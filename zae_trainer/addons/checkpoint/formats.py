"""The two on-disk formats of a checkpoint, and weights-only files.

``ckpt``
    One file written by ``torch.save`` and read only with ``torch.load(weights_only=True)``:
    the unpickler accepts tensors and plain containers and refuses everything else, so a
    planted file cannot run code. Nothing is allow-listed: RNG states are stored as tensors
    and ints (see :mod:`.rng`), so not even numpy's reconstructors are needed.

``safetensors``
    A folder: ``model.safetensors`` (the weights, readable by any safetensors tool),
    ``optimizer.safetensors`` (optimizer tensors), ``state.safetensors`` (any other tensors:
    RNG states, add-on buffers) and ``checkpoint.json`` (everything else, with references
    to those tensors). No pickle anywhere. The folder appears atomically, complete.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
from typing import Any, Mapping

import torch

from .atomic import publish_dir_atomic, write_file_atomic, write_path_atomic
from .errors import CheckpointCorruptError, CheckpointNotFoundError, CheckpointUnsafeError
from .safetensors_io import read_tensors, write_tensors
from .tree import join, split

__all__ = [
    "FORMATS",
    "normalise_format",
    "write_checkpoint",
    "read_checkpoint",
    "write_weights",
    "read_weights",
    "describe_folder",
]

FORMATS = ("ckpt", "safetensors")
_ALIASES = {"ckpt": "ckpt", "pt": "ckpt", "pth": "ckpt", "torch": "ckpt", "safetensors": "safetensors",
            "safetensor": "safetensors"}
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.safetensors"
JSON_FILE = "checkpoint.json"
SCHEMA_NAME = "zae_trainer.checkpoint"


def normalise_format(value: str) -> str:
    """``"ckpt"`` or ``"safetensors"``; zae-engine's spelling ``"safetensor"`` is accepted."""
    key = str(value).lower().lstrip(".")
    if key not in _ALIASES:
        raise ValueError(
            f"save_format must be 'ckpt' or 'safetensors' (zae-engine's 'safetensor' is accepted), got {value!r}"
        )
    return _ALIASES[key]


def describe_folder(path: str) -> str:
    """What the folder of ``path`` holds, for "not found" messages."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"the folder {folder!r} does not exist"
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return f"{folder!r} holds: {shown or '(nothing)'}"


def _missing(path: str, what: str = "checkpoint") -> CheckpointNotFoundError:
    return CheckpointNotFoundError(f"no {what} at {path!r}; {describe_folder(path)}", path)


# -- full checkpoints -----------------------------------------------------------------------


def write_checkpoint(path: str, checkpoint: Mapping[str, Any], fmt: str) -> None:
    """Write ``checkpoint`` to ``path`` (a file for ckpt, a folder for safetensors), atomically."""
    if fmt == "ckpt":
        write_path_atomic(path, lambda tmp: torch.save(dict(checkpoint), tmp))
        return
    buckets: dict[str, dict[str, torch.Tensor]] = {MODEL_FILE: {}, OPTIMIZER_FILE: {}, STATE_FILE: {}}
    model = checkpoint.get("model") or {}
    rest = {k: v for k, v in checkpoint.items() if k != "model"}

    def bucket_of(key: str) -> dict[str, torch.Tensor]:
        return buckets[OPTIMIZER_FILE if key.startswith("optimizer.") else STATE_FILE]

    tree = split(rest, bucket_of)
    tree["model"] = {"__zt__": "file", "name": MODEL_FILE}
    buckets[MODEL_FILE] = dict(model)

    def fill(folder: str) -> None:
        for name, tensors in buckets.items():
            if tensors or name == MODEL_FILE:
                write_file_atomic(os.path.join(folder, name), functools.partial(write_tensors, tensors=tensors))
        text = json.dumps(tree, indent=1, allow_nan=False).encode("utf-8")
        write_file_atomic(os.path.join(folder, JSON_FILE), lambda f: f.write(text))

    publish_dir_atomic(path, fill)


def read_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint in either format, safely. Raises an error naming ``path`` if it is bad."""
    if os.path.isdir(path):
        return _read_folder(path)
    if not os.path.exists(path):
        raise _missing(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != SCHEMA_NAME:
        kind = "a plain state_dict (weights only)" if _is_tensor_dict(obj) else f"a {type(obj).__name__}"
        raise CheckpointCorruptError(
            f"{path!r} is {kind}, not a zae_trainer checkpoint (no 'format': {SCHEMA_NAME!r}). To load weights "
            "alone use trainer.apply_weights(path).",
            path,
        )
    return obj


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not a planted object: garbage the unpickler cannot parse
            raise CheckpointCorruptError(
                f"{path!r} is not a readable checkpoint ({_unsafe_detail(exc)}); it is not a torch.save file or "
                "is damaged.",
                path,
            ) from exc
        raise CheckpointUnsafeError(
            f"refused to load {path!r}: it contains Python objects that safe loading (weights_only=True) does "
            f"not allow, so unpickling it could run arbitrary code. It was not executed. Detail: "
            f"{_unsafe_detail(exc)}. Only load files you trust, and "
            "re-save them as tensors and plain values.",
            path,
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
        raise CheckpointCorruptError(
            f"{path!r} is not a readable checkpoint ({_short(exc)}); the file is probably truncated (a write "
            f"or copy was interrupted) or is not a torch.save file. Size: {os.path.getsize(path)} bytes.",
            path,
        ) from exc


def _read_folder(path: str) -> dict[str, Any]:
    json_path = os.path.join(path, JSON_FILE)
    if not os.path.exists(json_path):
        raise CheckpointCorruptError(
            f"{path!r} is a folder but has no {JSON_FILE} ({describe_folder(path)}); it is not a complete "
            "safetensors checkpoint.",
            path,
        )
    try:
        with open(json_path, encoding="utf-8") as fh:
            tree = json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointCorruptError(f"{json_path!r} is not valid JSON ({exc}); the checkpoint is damaged.", path) from exc
    loaded: dict[str, dict[str, torch.Tensor]] = {}

    def bucket(name: str) -> dict[str, torch.Tensor]:
        if name not in loaded:
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise CheckpointCorruptError(f"checkpoint {path!r} lacks {name} ({describe_folder(path)})", path)
            loaded[name] = read_tensors(file)[0]
        return loaded[name]

    def tensor_for(key: str) -> torch.Tensor:
        name = OPTIMIZER_FILE if key.startswith("optimizer.") else STATE_FILE
        try:
            return bucket(name)[key]
        except KeyError:
            raise CheckpointCorruptError(f"checkpoint {path!r}: {name} has no tensor {key!r}", path) from None

    model_ref = tree.pop("model", None)
    obj = join(tree, tensor_for)
    obj["model"] = dict(bucket(MODEL_FILE)) if model_ref is not None else None
    if obj.get("format") != SCHEMA_NAME:
        raise CheckpointCorruptError(f"{json_path!r} is not a zae_trainer checkpoint (format {obj.get('format')!r})", path)
    return obj


def _unsafe_detail(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if "Unsupported" in line or "unsupported" in line:
            return line.strip().split(" was not an allowed")[0].replace("WeightsUnpickler error: ", "")
    return type(exc).__name__


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# -- weights only -------------------------------------------------------------------------


def write_weights(path: str, state_dict: Mapping[str, torch.Tensor], fmt: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write model weights alone: safetensors (for serving) or a ``torch.save`` state dict."""
    if fmt == "safetensors":
        write_file_atomic(path, lambda f: write_tensors(f, state_dict, metadata))
    else:
        write_path_atomic(path, lambda tmp: torch.save(dict(state_dict), tmp))


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Model weights from a weights file or from a full checkpoint of either format."""
    if os.path.isdir(path):
        return dict(read_checkpoint(path)["model"])
    if not os.path.exists(path):
        raise _missing(path, "weights file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if path.endswith((".safetensors", ".safetensor")) or (len(head) == 8 and not head.startswith(b"PK")):
        return read_tensors(path)[0]
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and obj.get("format") == SCHEMA_NAME:
        return dict(obj["model"])
    if _is_tensor_dict(obj):
        return dict(obj)
    raise CheckpointCorruptError(f"{path!r} holds neither weights nor a zae_trainer checkpoint ({type(obj).__name__})", path)
