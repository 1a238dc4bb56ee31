"""Reproducible runs: one call seeds every random number generator a training run draws from.

``seed_everything(seed)`` seeds Python's :mod:`random`, NumPy's global generator, and torch's
generators on the CPU and on every accelerator (``torch.manual_seed`` covers CUDA, MPS and
XPU). DataLoader workers then draw alike too: PyTorch derives each worker's seeds from one
number drawn from the (now seeded) torch generator. :func:`loader_seeding` goes one step
further and gives a loader its own generator, so that its shuffling does not depend on how
many random numbers the model drew before, plus :func:`seed_worker` for libraries PyTorch
does not reseed in workers.

``deterministic=True`` also asks PyTorch for deterministic kernels
(``torch.use_deterministic_algorithms(True)``, cuDNN without auto-tuning, and the cuBLAS
workspace setting CUDA needs for deterministic matrix products). That is slower, and an
operation with no deterministic kernel raises instead of running; ``"warn"`` warns instead.

The seed is recorded: a trainer constructed after ``seed_everything`` holds it in
``trainer.config["seed"]`` (and ``["deterministic"]``) unless the config already names one,
so the loggers write it with the rest of the run configuration.

Examples
--------
>>> from zae_trainer import seed_everything
>>> info = seed_everything(7)
>>> info.seed, info.deterministic
(7, False)
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
import torch

__all__ = ["SeedInfo", "seed_everything", "seed_worker", "loader_seeding", "current_seed"]

Deterministic = Union[bool, Literal["warn"]]

#: The cuBLAS workspace setting that makes CUDA matrix products deterministic (CUDA >= 10.2).
CUBLAS_WORKSPACE = ":4096:8"
_MAX_SEED = 2**32 - 1  # NumPy's global generator accepts no larger seed


@dataclass(frozen=True)
class SeedInfo:
    """What :func:`seed_everything` set, as recorded in a trainer's run configuration."""

    seed: int
    deterministic: Deterministic

    def as_config(self) -> dict[str, Any]:
        """The run-configuration entries: ``{"seed": ..., "deterministic": ...}``."""
        return {"seed": self.seed, "deterministic": self.deterministic}


_current: SeedInfo | None = None


def seed_everything(seed: int, deterministic: Deterministic = False) -> SeedInfo:
    """Seed Python, NumPy and torch (CPU and accelerators); optionally ask for determinism.

    Parameters
    ----------
    seed : int
        From 0 to 2**32 - 1 (NumPy's limit).
    deterministic : bool or "warn"
        ``True``: use only deterministic kernels (``torch.use_deterministic_algorithms``),
        turn cuDNN auto-tuning off and set ``CUBLAS_WORKSPACE_CONFIG`` when it is unset.
        ``"warn"``: the same, but an operation without a deterministic kernel warns rather
        than raising. ``False`` (default): PyTorch's determinism settings are left as they
        are, so that a call does not undo what the caller turned on.

    Returns
    -------
    SeedInfo
        The seed and the determinism setting. Trainers constructed afterwards in this process
        record both in ``trainer.config`` (unless the config already has a ``"seed"``).

    Notes
    -----
    Call it before building the model (weights are initialised from the seeded generator),
    and, with ``deterministic=True`` on a GPU, before the first CUDA operation: cuBLAS reads
    its workspace setting when it starts. Python's ``hash()`` randomisation is fixed only at
    interpreter start (``PYTHONHASHSEED``), so it is not covered.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= _MAX_SEED:
        raise ValueError(
            f"seed_everything: seed must be an integer from 0 to {_MAX_SEED}, got {seed!r}. "
            "To fix, pass a plain int such as seed_everything(42)."
        )
    if deterministic not in (True, False, "warn"):
        raise ValueError(
            f"seed_everything: deterministic must be True, False or 'warn', got {deterministic!r}"
        )
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the CPU generator and every accelerator's (CUDA, MPS, XPU)
    if deterministic:
        _use_deterministic_kernels(warn_only=deterministic == "warn")
    global _current
    _current = SeedInfo(seed, deterministic)
    return _current


def current_seed() -> SeedInfo | None:
    """What the last :func:`seed_everything` call in this process set, or ``None``."""
    return _current


def seed_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn`` that reseeds Python's and NumPy's generators in a worker.

    Each worker's torch seed is already distinct and derived from the loader's generator;
    this spreads it to :mod:`random` and NumPy as PyTorch's reproducibility notes recommend,
    for datasets that draw from them in versions or setups PyTorch does not reseed.
    """
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def loader_seeding(seed: int) -> dict[str, Any]:
    """DataLoader keywords that make its shuffling and its workers reproducible on their own.

    The loader gets its own ``torch.Generator`` seeded with ``seed``: its order then does not
    change when the model draws more or fewer random numbers, and a distributed sampler takes
    the same seed on every rank.

    Examples
    --------
    >>> from torch.utils.data import DataLoader
    >>> def order(seed):
    ...     loader = DataLoader(list(range(8)), batch_size=4, shuffle=True, **loader_seeding(seed))
    ...     return [b.tolist() for b in loader]
    >>> order(7) == order(7)
    True
    """
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return {"generator": generator, "worker_init_fn": seed_worker}


def _use_deterministic_kernels(*, warn_only: bool) -> None:
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            warnings.warn(
                "seed_everything(deterministic=...) set CUBLAS_WORKSPACE_CONFIG after CUDA started, so "
                "cuBLAS may not use it. To fix, call seed_everything before the first CUDA operation, or "
                f"export CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} before starting Python.",
                RuntimeWarning,
                stacklevel=3,
            )
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
