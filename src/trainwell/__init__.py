"""trainwell: correct, fast and measurable model-optimization techniques for PyTorch.

The public API. Each name lives in the package of its layer (see docs/architecture.md):
technique packages first, then the training loop.
"""

from typing import Any

from trainwell.distributed import all_reduce_mean, is_distributed, rank, world_size

# --- regularization/ ---
from trainwell.regularization import (
    DEFAULT_EXCLUDE,
    Dropout,
    DropoutSchedule,
    DropPath,
    Regularizer,
    dropout_modules,
    max_norm_,
    mc_predict,
    param_groups,
    scheduled_rate,
    set_dropout,
)

# --- gradients/ ---
from trainwell.gradients import (
    Accumulator,
    GradientTransform,
    GradMonitor,
    NonFiniteGradError,
    adaptive_clip,
    auto_clip,
    chain,
    clip_by_norm,
    clip_by_value,
    clip_grad_norm_,
    clip_grad_value_,
    grad_norm,
    layer_grad_norms,
    skip_nonfinite,
    zscore_clip,
)

# --- stopping.py ---
from trainwell.stopping import EarlyStopping

# --- checkpoints/ ---
from trainwell.checkpoints import (
    CheckpointError,
    CheckpointManager,
    load,
    rng_state,
    save,
    set_rng_state,
)

# --- averaging/ ---
from trainwell.averaging import EMA, SWA, average_weights, greedy_soup, uniform_soup, update_bn

# --- ensembles/ and metrics.py ---
from trainwell.ensembles import (
    Ensemble,
    TemperatureScaler,
    combine,
    combine_logits,
    fit_temperature,
)
from trainwell.metrics import (
    accuracy,
    brier,
    disagreement,
    ece,
    mae,
    mean_pairwise_kl,
    mse,
    nll,
    r2,
    reliability_diagram_data,
)

# --- training/ ---
from trainwell.training import FitResult, fit
from trainwell.training.steps import StepOutput, supervised_step


# --- study/ (imported when called, so that `import trainwell` stays light) ---
def ablate(config: Any, **kwargs: Any) -> Any:
    """Run an ablation study from Python and return its results.

    ``trainwell.ablate(config, model=Net, data=make_datasets, loss=..., jobs=1)``; see
    :func:`trainwell.study.api.ablate` for every argument and :class:`StudyResult`.
    """
    from trainwell.study.api import ablate as run

    return run(config, **kwargs)


__version__ = "0.1.0"
