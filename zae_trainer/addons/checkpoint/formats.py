"""The two on-disk formats of a checkpoint, and weights-only files.

``ckpt``
    One file written by ``torch.save`` and read only with ``torch.load(weights_only=True)``:
    the unpickler accepts tensors and plain containers and refuses everything else, so a
    planted file cannot run code. Nothing is allow-listed: RNG states are stored as tensors
    and ints (see :mod:`.rng`), so not even numpy's reconstructors are needed.

``safetensors``
    A folder: ``model.safetensors`` (the weights, readable by any safetensors tool),
    ``optimizer.safetensors`` (optimizer tensors, when there are any), ``state.safetensors``
    (any other tensors, e.g. add-on buffers such as a loss scaler's or EMA weights; only when
    there are any) and ``checkpoint.json`` (everything else, RNG states included, with
    references to those tensors). No pickle anywhere. The folder appears atomically, complete.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .atomic import publish_dir_atomic, write_file_atomic, write_path_atomic
from .errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError, CheckpointUnsafeError
from .safetensors_io import read_tensors, write_tensors
from .tree import join, split

__all__ = [
    "FORMATS",
    "CheckpointFormat",
    "register_format",
    "format_of",
    "normalise_format",
    "write_checkpoint",
    "read_checkpoint",
    "write_weights",
    "read_weights",
    "describe_folder",
]

_ALIASES = {"pt": "ckpt", "pth": "ckpt", "torch": "ckpt", "safetensor": "safetensors"}
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.safetensors"
JSON_FILE = "checkpoint.json"
SCHEMA_NAME = "zae_trainer.checkpoint"


@dataclass(frozen=True)
class CheckpointFormat:
    """How one ``save_format`` writes and reads a full checkpoint.

    ``write(path, checkpoint)`` must publish ``path`` atomically (complete or absent);
    ``read(path)`` returns the checkpoint tree or raises a :class:`CheckpointError` naming
    ``path``. ``suffix`` is appended to checkpoint names (``".ckpt"``; ``""`` for folders).
    ``owns(folder)`` says whether a folder on disk is one of this format's checkpoints.
    """

    name: str
    write: Callable[[str, Mapping[str, Any]], None]
    read: Callable[[str], dict[str, Any]]
    suffix: str = ""
    owns: Callable[[str], bool] | None = None


#: The formats ``save_format`` accepts, by name. Add one with :func:`register_format`.
FORMATS: dict[str, CheckpointFormat] = {}


def register_format(fmt: CheckpointFormat, aliases: tuple[str, ...] = ()) -> None:
    """Make ``fmt`` available as ``save_format=fmt.name`` (and its ``aliases``)."""
    FORMATS[fmt.name] = fmt
    for alias in aliases:
        _ALIASES[alias] = fmt.name


def normalise_format(value: str) -> str:
    """A registered format name; zae-engine's spelling ``"safetensor"`` is accepted."""
    key = str(value).lower().lstrip(".")
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        names = " or ".join(repr(n) for n in FORMATS)
        raise ValueError(
            f"save_format must be {names} (zae-engine's 'safetensor' is accepted), got {value!r}"
        )
    return key


def format_of(fmt: str) -> CheckpointFormat:
    """The registered format called ``fmt`` (any accepted spelling)."""
    return FORMATS[normalise_format(fmt)]


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
    """Write ``checkpoint`` to ``path`` in the format ``fmt``, atomically."""
    format_of(fmt).write(path, checkpoint)


def _write_ckpt(path: str, checkpoint: Mapping[str, Any]) -> None:
    write_path_atomic(path, lambda tmp: torch.save(dict(checkpoint), tmp))


def _write_safetensors(path: str, checkpoint: Mapping[str, Any]) -> None:
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
                write_path_atomic(os.path.join(folder, name), functools.partial(write_tensors, tensors=tensors))
        text = json.dumps(tree, indent=1, allow_nan=False).encode("utf-8")
        write_file_atomic(os.path.join(folder, JSON_FILE), lambda f: f.write(text))

    publish_dir_atomic(path, fill)


def read_checkpoint(path: str, foreign: bool = False) -> dict[str, Any]:
    """Read a checkpoint of any registered format, safely.

    With ``foreign=True``, a ``torch.save`` file written by another trainer (a lis2
    snapshot, ``{"model": ..., "optimizer": ..., "epoch": ...}``) that holds enough to
    resume is returned as a partial checkpoint (see :mod:`.foreign`).

    Raises
    ------
    CheckpointNotFoundError
        Nothing at ``path`` (the message lists what the folder holds).
    CheckpointCorruptError
        Anything at ``path`` that does not parse as a checkpoint (the message names ``path``).
    CheckpointUnsafeError
        A ``torch.save`` file holding objects whose unpickling could run code (refused unread).
    """
    if os.path.isdir(path):
        for fmt in FORMATS.values():
            if fmt.owns is not None and fmt.owns(path):
                return fmt.read(path)
        return _read_folder(path)  # its error says what a complete checkpoint folder holds
    if not os.path.exists(path):
        raise _missing(path)
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == SCHEMA_NAME:
        return _checked(obj, path)
    from .foreign import describe, resumable_checkpoint

    if foreign:
        converted = resumable_checkpoint(obj, path)
        if converted is not None:
            return converted
    raise CheckpointCorruptError(
        f"{path!r} is {describe(obj)}, not a zae_trainer checkpoint (no 'format': {SCHEMA_NAME!r}) and not "
        "one that holds enough to resume (model weights, optimizer state and an epoch). To load weights "
        "alone use trainer.apply_weights(path).",
        path,
    )


def _read_ckpt(path: str) -> dict[str, Any]:
    return read_checkpoint(path)


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
            f"{_unsafe_detail(exc)}. To convert a file you trust, load it once in a trusted session "
            "(torch.load(path, weights_only=False)), keep only tensors and plain values (a module's "
            ".state_dict(), the optimizer's .state_dict(), numbers, strings; a config object as a dict) and "
            "re-save, e.g. torch.save({'model': ..., 'optimizer': ..., 'epoch': ...}, 'converted.pt').",
            path,
        ) from exc
    except Exception as exc:  # any failure to parse (IndexError, struct.error, ... from garbage) is damage
        raise CheckpointCorruptError(
            f"{path!r} is not a readable checkpoint ({_short(exc)}); the file is probably truncated (a write "
            f"or copy was interrupted) or is not a torch.save file. Size: {os.path.getsize(path)} bytes.",
            path,
        ) from exc


def _read_folder(path: str) -> dict[str, Any]:
    try:
        return _read_folder_unchecked(path)
    except CheckpointError:
        raise
    except Exception as exc:  # well-formed JSON of the wrong shape, odd tensors: damage all the same
        raise CheckpointCorruptError(
            f"{path!r} is not a readable safetensors checkpoint ({_short(exc)}); it is damaged or was not "
            "written by zae_trainer.",
            path,
        ) from exc


def _owns_folder(path: str) -> bool:
    return os.path.exists(os.path.join(path, JSON_FILE))


def _read_folder_unchecked(path: str) -> dict[str, Any]:
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
    return _checked(obj, path)


def _checked(obj: dict[str, Any], path: str) -> dict[str, Any]:
    """``obj`` if its skeleton is whole (weights and progress); else the file is damaged."""
    model = obj.get("model")
    weights_ok = isinstance(model, Mapping) and all(isinstance(v, torch.Tensor) for v in model.values())
    if not weights_ok or not isinstance(obj.get("progress"), Mapping):
        raise CheckpointCorruptError(
            f"{path!r} is damaged: it is marked as a zae_trainer checkpoint but its 'model' or 'progress' entry "
            "is missing or of the wrong kind. Use an earlier checkpoint.",
            path,
        )
    return obj


register_format(CheckpointFormat("ckpt", _write_ckpt, _read_ckpt, suffix=".ckpt"), aliases=("pt", "pth", "torch"))
register_format(CheckpointFormat("safetensors", _write_safetensors, _read_folder, owns=_owns_folder),
                aliases=("safetensor",))


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
        write_path_atomic(path, lambda tmp: write_tensors(tmp, state_dict, metadata))
    else:
        write_path_atomic(path, lambda tmp: torch.save(dict(state_dict), tmp))


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Model weights from a weights file or from a full checkpoint of either format."""
    if os.path.isdir(path):
        return dict(read_checkpoint(path)["model"])
    if not os.path.exists(path):
        raise _missing(path, "weights file")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if path.endswith((".safetensors", ".safetensor")) or head[8:9] == b"{":  # 8-byte header size, then JSON
        return read_tensors(path)[0]
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and obj.get("format") == SCHEMA_NAME:
        model = obj.get("model")
        if not _is_tensor_dict(model):
            raise CheckpointCorruptError(f"{path!r} is a zae_trainer checkpoint without model weights", path)
        return dict(model)
    from .foreign import describe, foreign_weights

    weights = foreign_weights(obj)
    if weights is None:
        raise CheckpointCorruptError(
            f"{path!r} holds no model weights that can be found: it is {describe(obj)}. Weights are read from a "
            "state_dict, a zae_trainer checkpoint, a lis2 snapshot ({'MODEL': {'state': ...}}) or a dict with "
            "'model', 'model_state_dict' or 'state_dict'. To fix, save the model's state_dict alone "
            "(torch.save(model.state_dict(), path)).",
            path,
        )
    return weights
