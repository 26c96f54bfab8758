"""Gradient handling: transforms (clip by value / norm, adaptive rules, non-finite guard,
chain), monitoring and exact accumulation."""

from trainwell.gradients.accumulation import Accumulator
from trainwell.gradients.adaptive import adaptive_clip, auto_clip, zscore_clip
from trainwell.gradients.monitor import GradMonitor, grad_norm, layer_grad_norms
from trainwell.gradients.transforms import (
    GradientTransform,
    NonFiniteGradError,
    chain,
    clip_by_norm,
    clip_by_value,
    clip_grad_norm_,
    clip_grad_value_,
    skip_nonfinite,
)
