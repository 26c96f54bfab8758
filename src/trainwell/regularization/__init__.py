"""Weight regularization: L1/L2 penalties, decoupled weight decay groups, max-norm; dropout."""

from trainwell.regularization.dropout import (
    Dropout,
    DropoutSchedule,
    DropPath,
    dropout_modules,
    mc_predict,
    scheduled_rate,
    set_dropout,
)
from trainwell.regularization.penalties import (
    DEFAULT_EXCLUDE,
    Regularizer,
    max_norm_,
    param_groups,
)
