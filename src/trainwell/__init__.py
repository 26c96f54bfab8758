"""trainwell: correct, fast and measurable model-optimization techniques for PyTorch."""

from trainwell.distributed import all_reduce_mean, is_distributed, rank, world_size

# --- regularization (regularization.py) ---
from trainwell.regularization import DEFAULT_EXCLUDE, Regularizer, max_norm_, param_groups

# --- dropout (dropout.py) ---
from trainwell.dropout import (
    Dropout,
    DropoutSchedule,
    DropPath,
    dropout_modules,
    mc_predict,
    scheduled_rate,
    set_dropout,
)

# --- gradients (clipping.py, monitoring.py) ---
# --- accumulation (accumulation.py) ---
# --- stopping (stopping.py) ---
from trainwell.stopping import EarlyStopping
# --- checkpoints (checkpoint.py) ---
from trainwell.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load,
    rng_state,
    save,
    set_rng_state,
)
# --- averaging (averaging.py) ---
# --- ensembles and metrics (ensemble.py, metrics.py) ---
# --- loop (loop.py) ---

__version__ = "0.1.0"
