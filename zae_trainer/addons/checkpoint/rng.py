"""Random number generator states as plain values, so checkpoints need no unpickling.

Captured: Python's ``random``, numpy's global generator, torch's CPU generator and every
CUDA device's generator. Each generator's key is stored as its raw bytes written out in hex
(a ``str``): a string is one object to ``torch.save``'s pickler and plain text to JSON, where
a tensor costs the pickler a reduction, a storage record and about twenty small objects
(a checkpoint write took ~0.6 million instructions more with the three keys as tensors). The
integers around the keys (Python's state version, numpy's position and cached Gaussian) stay
numbers. Keys saved as tensors (format version 2 files from before this encoding) still load.

A generator nothing has drawn from since the last capture is not encoded again (see
``_python_state`` and the functions after it): checkpoints are written every epoch, and the
Python and numpy generators often sit unused, while reading numpy's state through
``get_state()`` alone costs about half a million instructions.
"""

from __future__ import annotations

import ctypes
import random
import struct
import warnings
from typing import Any

import torch

__all__ = ["capture_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """The current state of every global generator a training loop draws from."""
    state: dict[str, Any] = {"python": _python_state(), "torch": _torch_state(), "cuda": []}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        state["numpy"] = None
    else:
        state["numpy"] = _numpy_state(np)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_hex(s) for s in torch.cuda.get_rng_state_all()]
    return state


# -- unchanged generators are not encoded again ------------------------------------------------
# A checkpoint is written every epoch, and often nothing has drawn from Python's or numpy's
# generator since the last one (the loader shuffles with torch's). Each cache holds the last
# raw state read and its encoding; a generator whose raw state is byte-for-byte the same is
# not encoded again (hex text of a 2.5-5 kB key is ~15 instructions a byte).
_last_python: tuple[tuple[int, ...], str] | None = None
_last_torch: tuple[bytes, str] | None = None
_last_numpy: tuple[bytes, dict[str, Any]] | None = None
_MT_KEY_WORDS = 624


def _python_state() -> dict[str, Any]:
    global _last_python
    version, words, gauss = random.getstate()
    last = _last_python
    if last is not None and last[0] == words:
        text = last[1]
    else:
        text = struct.pack(f"={len(words)}I", *words).hex()
        _last_python = (words, text)
    return {"version": version, "state": text, "gauss": gauss}


def _torch_state() -> str:
    global _last_torch
    raw = torch.get_rng_state().numpy().tobytes()
    last = _last_torch
    if last is not None and last[0] == raw:
        return last[1]
    text = raw.hex()
    _last_torch = (raw, text)
    return text


def _numpy_raw(np: Any) -> bytes | None:
    """The global MT19937's key and position as raw bytes (its C struct), or None if unreadable.

    ``np.random.get_state()`` copies the 624-word key one element at a time (about 0.5
    million instructions); the bit generator's documented ``ctypes.state_address`` gives the
    same words in one copy. Used only to see whether the state changed since the last full
    read, never as the state itself; and a full read is cached only after its raw read gave
    exactly its key and position, so a numpy laid out differently is read in full every time.
    """
    try:
        generator = np.random.get_state.__self__._bit_generator
        if type(generator).__name__ != "MT19937":
            return None
        return ctypes.string_at(generator.ctypes.state_address, _MT_KEY_WORDS * 4 + 4)
    except Exception:  # a numpy without these attributes: always read the full state
        return None


def _numpy_state(np: Any) -> dict[str, Any]:
    """numpy's global generator (the legacy ``np.random.*`` functions), in ``get_state()``'s terms.

    The last full read is reused when the raw key and position are unchanged and no normal
    value was cached (``has_gauss`` 0): drawing anything moves the position or regenerates
    the key, and a cached normal is only ever consumed, never created, without a draw. (The
    one way around it is ``np.random.set_state()`` back to the very key and position the
    generator already had, with a cached normal added: then the next checkpoint would miss
    that one cached value.) With a cached normal the state is read in full every time.
    """
    global _last_numpy
    raw = _numpy_raw(np)
    last = _last_numpy
    if raw is not None and last is not None and last[0] == raw:
        return dict(last[1])
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    words = np.ascontiguousarray(keys, dtype="<u4").tobytes()
    state = {
        "kind": str(kind),
        "keys": words.hex(),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    read_back = _numpy_raw(np)
    expected = np.ascontiguousarray(keys, dtype="=u4").tobytes() + struct.pack("=i", int(pos))
    _last_numpy = (read_back, state) if read_back is not None and read_back == expected and not has_gauss else None
    return dict(state)


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
