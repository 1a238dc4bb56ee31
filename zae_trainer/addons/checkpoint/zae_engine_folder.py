"""zae-engine's checkpoint folder: find it, read it safely, write it.

zae-engine's ``StateManagerAddon`` keeps one state per folder, overwritten at every improving
epoch::

    <save_path>/model.ckpt          torch.save(model.state_dict())     (save_format="ckpt")
    <save_path>/model.safetensor    safetensors weights                 (save_format="safetensor")
    <save_path>/optimizer.zae       pickle.dump(optimizer.state_dict())
    <save_path>/scheduler.zae       pickle.dump(scheduler.state_dict())

There is no progress, RNG state or manifest: what such a folder restores is the weights, the
optimizer and the scheduler. The core state manager uses :func:`find` so that
``load_state(folder)`` / ``resume=`` on such a folder loads it instead of finding "no
checkpoint"; :mod:`zae_trainer.compat` uses :func:`write` and :func:`load_into` for its
zae-engine ``save_state()`` / ``load_state()``.

Safety: ``.zae`` files are plain pickles, and unpickling can run code. They are read with
``torch.load(weights_only=True)`` when they are ``torch.save`` files, and otherwise by an
unpickler that builds only containers, numbers, strings and tensors (tensor storage itself
goes through ``torch.load(weights_only=True)``). Anything else in the file is refused unread
with :class:`~.errors.CheckpointUnsafeError`, whose message says how to convert a trusted
folder (:func:`convert`).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from .atomic import write_file_atomic, write_path_atomic
from .errors import CheckpointCorruptError, CheckpointNotFoundError, CheckpointUnsafeError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = [
    "MODEL_FILES",
    "OPTIMIZER_FILE",
    "SCHEDULER_FILE",
    "ZaeEngineFolder",
    "find",
    "find_for_load",
    "read_model",
    "read_state",
    "write",
    "write_state",
    "load_into",
    "load_into_trainer",
    "convert",
]

#: model file names zae-engine writes, by its ``save_format`` ("safetensors" is accepted too)
MODEL_FILES = {"ckpt": "model.ckpt", "safetensor": "model.safetensor", "safetensors": "model.safetensors"}
OPTIMIZER_FILE = "optimizer.zae"
SCHEDULER_FILE = "scheduler.zae"


@dataclass(frozen=True)
class ZaeEngineFolder:
    """What a zae-engine folder holds: the paths present (None where a file is absent)."""

    folder: str
    model: str | None
    optimizer: str | None
    scheduler: str | None

    def describe(self) -> str:
        """One line naming the files found, for messages."""
        names = [os.path.basename(p) for p in (self.model, self.optimizer, self.scheduler) if p]
        return f"zae-engine checkpoint folder {self.folder!r} with {', '.join(names)}"


def find(path: str | os.PathLike[str], save_format: str | None = None) -> ZaeEngineFolder | None:
    """The zae-engine layout at ``path`` (a folder, or a file inside one), else None.

    A folder counts when it holds a zae-engine model file or a ``.zae`` file; the model file
    of ``save_format`` ("ckpt" / "safetensor") is preferred when several exist.
    """
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return None
    if not os.path.isdir(path) and os.path.basename(path) not in (*MODEL_FILES.values(), OPTIMIZER_FILE, SCHEDULER_FILE):
        return None
    order = list(MODEL_FILES.values())
    if save_format in MODEL_FILES:
        order.insert(0, MODEL_FILES[save_format])
    if os.path.basename(path) in MODEL_FILES.values():
        order.insert(0, os.path.basename(path))
    model = next((os.path.join(folder, n) for n in order if os.path.isfile(os.path.join(folder, n))), None)
    optimizer = os.path.join(folder, OPTIMIZER_FILE)
    scheduler = os.path.join(folder, SCHEDULER_FILE)
    found = ZaeEngineFolder(
        folder,
        model,
        optimizer if os.path.isfile(optimizer) else None,
        scheduler if os.path.isfile(scheduler) else None,
    )
    return found if (found.model or found.optimizer or found.scheduler) else None


def find_for_load(path: str | os.PathLike[str]) -> ZaeEngineFolder | None:
    """Like :func:`find`, but None for a zae_trainer checkpoint folder (one with ``checkpoint.json``).

    Used by the core state manager before it reads ``path`` as a zae_trainer checkpoint.
    """
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(folder, "checkpoint.json")):
        return None
    return find(path)


# -- reading -------------------------------------------------------------------------------


def read_model(path: str) -> dict[str, torch.Tensor]:
    """Model weights from ``model.ckpt`` (``torch.load(weights_only=True)``) or ``model.safetensor(s)``."""
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"no zae-engine model file {path!r}", path)
    if path.endswith((".safetensor", ".safetensors")):
        from safetensors.torch import load_file

        try:
            return dict(load_file(path, device="cpu"))
        except Exception as exc:
            raise CheckpointCorruptError(
                f"{path!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is damaged or "
                "was not written by safetensors.",
                path,
            ) from exc
    weights = read_state(path)
    if not (isinstance(weights, Mapping) and all(isinstance(v, torch.Tensor) for v in weights.values())):
        raise CheckpointCorruptError(
            f"{path!r} holds {type(weights).__name__}, not a model state_dict (names -> tensors), which is what "
            "zae-engine's save_model writes",
            path,
        )
    return dict(weights)


def read_state(path: str) -> Any:
    """A ``.zae`` / ``.ckpt`` file's content, without running code from it.

    ``torch.save`` files go through ``torch.load(weights_only=True)``; plain pickles (what
    zae-engine writes) through an unpickler that builds only containers, numbers, strings
    and tensors.

    Raises
    ------
    CheckpointUnsafeError
        The file needs other Python objects to be rebuilt; nothing from it was executed.
    CheckpointCorruptError
        The file is neither a ``torch.save`` file nor a pickle (truncated, garbled).
    """
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"no file {path!r}", path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK"):  # torch.save's zip container
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _unsafe(path, str(exc).splitlines()[0]) from exc
        except Exception as exc:
            raise _corrupt(path, exc) from exc
    try:
        with open(path, "rb") as fh:
            return _DataUnpickler(fh).load()
    except _Refused as exc:
        raise _unsafe(path, str(exc)) from exc
    except Exception as exc:
        raise _corrupt(path, exc) from exc


class _Refused(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""


def _load_storage(data: bytes) -> Any:
    # A tensor pickled with plain pickle carries its storage as torch.save bytes.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


#: the only callables a zae-engine pickle may name: what optimizer and scheduler state dicts hold
_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise _Refused(f"it names {module}.{name}")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"it uses persistent id {pid!r}")


def _unsafe(path: str, detail: str) -> CheckpointUnsafeError:
    return CheckpointUnsafeError(
        f"refused to read {path!r}: {detail}, and rebuilding that object could run arbitrary code, so nothing "
        "from the file was executed. zae-engine pickles its optimizer/scheduler state; zae_trainer reads such "
        "files only when they hold plain values and tensors. To convert a folder you trust, run once in a "
        "trusted session: from zae_trainer.addons.checkpoint.zae_engine_folder import convert; "
        f"convert({os.path.dirname(path)!r}, trust_pickles=True)",
        path,
    )


def _corrupt(path: str, exc: BaseException) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{path!r} is neither a torch.save file nor a pickle ({type(exc).__name__}: {exc}); it is truncated or "
        f"damaged. Size: {os.path.getsize(path)} bytes.",
        path,
    )


# -- writing -------------------------------------------------------------------------------


def write(
    folder: str,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any] | None,
    scheduler_state: Mapping[str, Any] | None,
    save_format: str = "ckpt",
) -> list[str]:
    """Write zae-engine's layout into ``folder``; return the paths written.

    Each file is replaced atomically (a crash leaves the previous file). ``.zae`` files are
    pickles as zae-engine writes them, so zae-engine can read them back; ``None`` states are
    not written (zae-engine would fail on a missing scheduler).
    """
    if save_format not in MODEL_FILES:
        raise ValueError(f"save_format must be one of {sorted(MODEL_FILES)}, got {save_format!r}")
    os.makedirs(folder, exist_ok=True)
    written = []
    model_path = os.path.join(folder, MODEL_FILES[save_format])
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    if save_format == "ckpt":
        write_path_atomic(model_path, lambda tmp: torch.save(weights, tmp))
    else:
        from safetensors.torch import save_file

        write_path_atomic(model_path, lambda tmp: save_file(_unshared(weights), tmp))
    written.append(model_path)
    for name, state in ((OPTIMIZER_FILE, optimizer_state), (SCHEDULER_FILE, scheduler_state)):
        if state is not None:
            written.append(write_state(os.path.join(folder, name), state))
    return written


def write_state(path: str, state: Mapping[str, Any]) -> str:
    """Write one ``.zae`` file atomically: a pickle of ``state`` with tensors on the CPU."""
    data = pickle.dumps(_on_cpu(state))
    write_file_atomic(path, lambda f: f.write(data))
    return path


def _on_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return type(obj)((k, _on_cpu(v)) for k, v in obj.items()) if isinstance(obj, collections.OrderedDict) else {
            k: _on_cpu(v) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for key, value in weights.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


# -- applying ------------------------------------------------------------------------------


def load_into(
    found: ZaeEngineFolder,
    model: "nn.Module | None",
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    strict: bool = True,
) -> list[str]:
    """Load what ``found`` holds into the given objects; return the files applied.

    A file without an object to receive it (a scheduler state but ``scheduler=None``) is
    reported with a warning, never dropped silently. A model saved from a
    ``DistributedDataParallel`` wrapper (keys ``module.*``) loads into the bare model.
    """
    applied = []
    if found.model is not None and model is not None:
        weights = read_model(found.model)
        own = model.state_dict()
        if weights and all(k.startswith("module.") for k in weights) and not any(k.startswith("module.") for k in own):
            weights = {k[len("module."):]: v for k, v in weights.items()}
        from .schema import check_model_fits

        model.load_state_dict(check_model_fits(model, weights, found.model, strict), strict=strict)
        applied.append(found.model)
    for path, target, what in (
        (found.optimizer, optimizer, "optimizer"),
        (found.scheduler, scheduler, "scheduler"),
    ):
        if path is None:
            continue
        if target is None:
            warnings.warn(
                f"{path!r} holds a {what} state but the trainer has no {what}; it was not loaded",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        target.load_state_dict(read_state(path))
        applied.append(path)
    if found.model is not None and model is None:
        warnings.warn(f"{found.model!r} holds model weights but there is no model to load them into",
                      RuntimeWarning, stacklevel=3)
    return applied


def load_into_trainer(trainer: Any, found: ZaeEngineFolder, strict: bool = True) -> str:
    """The core state manager's ``load_state`` / ``resume=`` on a zae-engine folder.

    Loads the weights, the optimizer and the scheduler, and warns that the folder records no
    progress, RNG state or data position, so counting continues from this trainer's own.
    A folder without a model file is refused: resuming from optimizer state alone would
    train a fresh model with a stale optimizer.
    """
    if found.model is None:
        raise CheckpointCorruptError(
            f"{found.describe()}, but no model file ({', '.join(sorted(set(MODEL_FILES.values())))}); there "
            "is nothing to resume. To fix, point load_state/resume at a folder that holds the model weights.",
            found.folder,
        )
    applied = load_into(found, trainer.raw_model, trainer.optimizer, trainer.scheduler, strict)
    warnings.warn(
        f"loaded {found.describe()} ({', '.join(os.path.basename(p) for p in applied)}). zae-engine folders "
        "record no progress, RNG state or data position: the run continues at epoch "
        f"{trainer.progress_checker.epoch + 1} of this trainer's count. Checkpoints saved from now on are "
        "complete zae_trainer checkpoints.",
        RuntimeWarning,
        stacklevel=4,
    )
    return found.folder


def _save_as_torch(path: str, state: Any) -> None:
    write_path_atomic(path, lambda tmp: torch.save(state, tmp))


def convert(folder: str, *, trust_pickles: bool = False) -> list[str]:
    """Rewrite a trusted zae-engine folder's ``.zae`` pickles so that they load safely.

    Only for folders you trust: this unpickles the files with plain :mod:`pickle`, which runs
    whatever code they name. Each ``.zae`` file is then re-saved with ``torch.save`` (the
    original kept as ``<name>.orig``), which :func:`read_state` reads with
    ``weights_only=True``. Returns the files converted.
    """
    if not trust_pickles:
        raise PermissionError(
            "convert() unpickles the folder's .zae files, which can run arbitrary code. Call it with "
            "trust_pickles=True only for a folder you wrote yourself or otherwise trust."
        )
    found = find(folder)
    if found is None:
        raise CheckpointNotFoundError(f"{folder!r} holds no zae-engine files (model.ckpt, optimizer.zae, ...)", folder)
    converted = []
    for path in (found.optimizer, found.scheduler):
        if path is None:
            continue
        with open(path, "rb") as fh:
            state = pickle.load(fh)  # noqa: S301 - the caller vouched for this folder
        shutil.copy2(path, path + ".orig")
        _save_as_torch(path, state)
        converted.append(path)
    return converted
