"""The training loop: ``fit()`` and its result, the resume snapshot, evaluation passes, the
progress bar."""

from trainwell.training.loop import fit
from trainwell.training.result import FitResult
