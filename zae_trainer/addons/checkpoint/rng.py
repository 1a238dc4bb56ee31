"""Random number generator states as plain values, so checkpoints need no unpickling.

Captured: Python's ``random``, numpy's global generator, torch's CPU generator and every
CUDA device's generator. Each generator's key is stored as its raw bytes written out in hex
(a ``str``): a string is one object to ``torch.save``'s pickler and plain text to JSON, where
a tensor costs the pickler a reduction, a storage record and about twenty small objects
(a checkpoint write took ~0.6 million instructions more with the three keys as tensors). The
integers around the keys (Python's state version, numpy's position and cached Gaussian) stay
numbers. Keys saved as tensors (format version 2 files from before this encoding) still load.
"""

from __future__ import annotations

import random
import struct
import warnings
from typing import Any

import torch

__all__ = ["capture_rng", "restore_rng"]

def capture_rng() -> dict[str, Any]:
    """The current state of every global generator a training loop draws from."""
    version, words, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": struct.pack(f"={len(words)}I", *words).hex(), "gauss": gauss},
        "torch": _hex(torch.get_rng_state()),
        "cuda": [],
    }
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        state["numpy"] = None
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "kind": str(kind),
            "keys": np.ascontiguousarray(keys, dtype="<u4").tobytes().hex(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_hex(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _hex(byte_tensor: torch.Tensor) -> str:
    """A ``uint8`` generator state (torch's own format) as hex text."""
    return byte_tensor.cpu().numpy().tobytes().hex()


def _byte_tensor(saved: str | torch.Tensor) -> torch.Tensor:
    """A torch generator state back as the ``uint8`` tensor ``set_rng_state`` takes."""
    if isinstance(saved, str):
        return torch.frombuffer(bytearray.fromhex(saved), dtype=torch.uint8)
    return saved.to(torch.uint8)  # a tensor: files written before the hex encoding


def _python_words(saved: Any) -> tuple[int, ...]:
    if isinstance(saved, str):
        raw = bytes.fromhex(saved)
        return struct.unpack(f"={len(raw) // 4}I", raw)
    return tuple(int(w) for w in saved.tolist())


def _numpy_keys(saved: Any) -> Any:
    import numpy as np

    if isinstance(saved, str):
        return np.frombuffer(bytes.fromhex(saved), dtype="<u4").astype("uint32")
    return saved.numpy().astype("uint32")


def restore_rng(state: dict[str, Any]) -> None:
    """Put every generator back to ``state`` (from :func:`capture_rng`)."""
    py = state["python"]
    random.setstate((int(py["version"]), _python_words(py["state"]), py["gauss"]))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    np_state = state.get("numpy")
    if np_state is not None:
        import numpy as np

        np.random.set_state(
            (
                np_state["kind"],
                _numpy_keys(np_state["keys"]),
                int(np_state["pos"]),
                int(np_state["has_gauss"]),
                float(np_state["cached_gaussian"]),
            )
        )
    cuda = list(state.get("cuda") or [])
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([_byte_tensor(s) for s in cuda])
        else:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            warnings.warn(
                f"the checkpoint holds RNG states for {len(cuda)} CUDA device(s) but {count} are visible; CUDA "
                "random streams (dropout on the GPU) will differ from the original run.",
                RuntimeWarning,
                stacklevel=2,
            )
