"""Checkpoints: the crash-safe, code-free file format, a run's checkpoint directory and the
RNG state that exact resume needs."""

from trainwell.checkpoints.format import CheckpointError, load, read_metadata, save, verify
from trainwell.checkpoints.manager import CheckpointInfo, CheckpointManager
from trainwell.checkpoints.rng import rng_state, set_rng_state
