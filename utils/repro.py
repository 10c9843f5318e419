"""Reproducibility: explicit seeds and device selection."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


__all__ = [
    "seed_everything",
    "get_device",
]


_DEVICE_KINDS = ("cpu", "cuda", "mps")


def seed_everything(seed: int) -> int:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) random generators.

    Returns the seed, so a chapter can write ``SEED = seed_everything(0)``.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PYTHONHASHSEED"] = str(seed)  # for subprocesses started from here
    return seed


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: ``device`` if given, else CUDA when present, else CPU.

    Raises a ``ValueError`` naming the valid choices for an unknown device string, and a
    ``RuntimeError`` if CUDA is asked for on a machine without it.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"Unknown device {device!r}. Use one of {', '.join(_DEVICE_KINDS)} "
            "(optionally with an index, e.g. 'cuda:0'), or None to pick automatically."
        ) from err
    if dev.type not in _DEVICE_KINDS:
        raise ValueError(f"Unsupported device {device!r}. Use one of {', '.join(_DEVICE_KINDS)} or None.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"Device {device!r} was asked for, but this machine has no CUDA GPU. "
            "Pass device='cpu' or device=None (which picks CUDA only when present)."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"Device {device!r} was asked for, but MPS is not available here. Use 'cpu'.")
    return dev
