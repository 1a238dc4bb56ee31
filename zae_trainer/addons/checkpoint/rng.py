"""Random number generator states as tensors and ints, so checkpoints need no unpickling.

Captured: Python's ``random``, numpy's global generator, torch's CPU generator and every
CUDA device's generator. Python's and numpy's states are tuples holding a 624-word
Mersenne Twister key; they are stored as ``int64`` tensors plus ints, which both formats
hold natively, and converted back on restore.
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
        "python": {"version": version, "state": _int64_tensor(words), "gauss": gauss},
        "torch": torch.get_rng_state(),
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
            "keys": torch.from_numpy(np.asarray(keys).astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def _int64_tensor(words: tuple[int, ...]) -> torch.Tensor:
    """``torch.tensor(words, dtype=torch.int64)``, at a quarter of the cost for the 625-word key.

    ``torch.tensor`` converts a sequence element by element through its argument parser;
    ``struct`` packs the ints in one C loop and the tensor takes the buffer (and keeps it).
    """
    return torch.frombuffer(bytearray(struct.pack(f"={len(words)}q", *words)), dtype=torch.int64)


def restore_rng(state: dict[str, Any]) -> None:
    """Put every generator back to ``state`` (from :func:`capture_rng`)."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(w) for w in py["state"].tolist()), py["gauss"]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    np_state = state.get("numpy")
    if np_state is not None:
        import numpy as np

        np.random.set_state(
            (
                np_state["kind"],
                np_state["keys"].numpy().astype("uint32"),
                int(np_state["pos"]),
                int(np_state["has_gauss"]),
                float(np_state["cached_gaussian"]),
            )
        )
    cuda = list(state.get("cuda") or [])
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda])
        else:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            warnings.warn(
                f"the checkpoint holds RNG states for {len(cuda)} CUDA device(s) but {count} are visible; CUDA "
                "random streams (dropout on the GPU) will differ from the original run.",
                RuntimeWarning,
                stacklevel=2,
            )
