"""rng_state / set_rng_state: every global RNG restored through a checkpoint file."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from trainwell import load, rng_state, save, set_rng_state


def test_rng_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    random.gauss(0, 1)  # a cached gaussian is part of the state
    np.random.standard_normal()
    path = save(tmp_path / "rng", {"rng": rng_state(), "torch": torch.get_rng_state()})
    first = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.standard_normal(3))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    state = load(path)
    assert torch.equal(state["torch"], state["rng"]["torch"])
    set_rng_state(state["rng"])
    second = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.standard_normal(3))
    assert torch.equal(first[0], second[0]) and first[1:3] == second[1:3]
    assert np.array_equal(first[3], second[3])


# ------------------------------------------------------------------ corruption and pickle
