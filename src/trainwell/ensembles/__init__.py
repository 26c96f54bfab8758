"""Model ensembles: combination rules and the ensemble module, the batched pass over members
of one architecture, temperature scaling."""

from trainwell.ensembles.calibration import TemperatureScaler, fit_temperature
from trainwell.ensembles.ensemble import Ensemble, combine, combine_logits
