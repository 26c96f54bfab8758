"""Every global RNG a training run draws from, captured and restored (for exact resume).

``rng_state`` returns the states of torch (CPU and every CUDA device), Python's ``random``
and numpy's global generator as plain data that ``save`` can store; ``set_rng_state`` puts
them back, so a resumed run draws the same dropout masks, shuffles and augmentations as an
uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    """Every global RNG a training run draws from: torch CPU (+ CUDA), ``random``, numpy.

    The result can be stored with ``save`` and restored with ``set_rng_state``, so a
    resumed run draws the same dropout masks, shuffles and augmentations.

    Example:
        >>> s = rng_state(); a = torch.rand(2); set_rng_state(s)
        >>> torch.equal(a, torch.rand(2))
        True
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNGs captured by ``rng_state`` (keys that are absent are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        saved = list(state["cuda"])[: torch.cuda.device_count()]
        for i, s in enumerate(saved):
            torch.cuda.set_rng_state(s, i)
    if state.get("numpy") is not None:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
