"""trainwell: correct, fast and measurable model-optimization techniques for PyTorch."""

from trainwell.distributed import all_reduce_mean, is_distributed, rank, world_size

# --- regularization (regularization.py) ---
# --- dropout (dropout.py) ---
# --- gradients (clipping.py, monitoring.py) ---
# --- accumulation (accumulation.py) ---
# --- stopping (stopping.py) ---
# --- checkpoints (checkpoint.py) ---
# --- averaging (averaging.py) ---
# --- ensembles and metrics (ensemble.py, metrics.py) ---
# --- loop (loop.py) ---

__version__ = "0.1.0"
