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
from trainwell.clipping import (
    GradientTransform,
    NonFiniteGradError,
    chain,
    clip_by_norm,
    clip_by_value,
    clip_grad_norm_,
    clip_grad_value_,
    skip_nonfinite,
)
from trainwell.adaptive_clipping import adaptive_clip, auto_clip, zscore_clip
from trainwell.monitoring import GradMonitor, grad_norm, layer_grad_norms

# --- accumulation (accumulation.py) ---
from trainwell.accumulation import Accumulator

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
from trainwell.averaging import average_weights, update_bn
from trainwell.running_average import EMA, SWA
from trainwell.soups import greedy_soup, uniform_soup

# --- ensembles and metrics (ensemble.py, metrics.py) ---
from trainwell.ensemble import Ensemble, combine, combine_logits
from trainwell.calibration import TemperatureScaler, fit_temperature
from trainwell.metrics import (
    accuracy,
    brier,
    disagreement,
    ece,
    mean_pairwise_kl,
    nll,
    reliability_diagram_data,
)

# --- loop (loop.py) ---
from trainwell.loop import FitResult, fit

__version__ = "0.1.0"
