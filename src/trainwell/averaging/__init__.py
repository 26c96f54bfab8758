"""Weight averaging: uniform / weighted averages and BatchNorm recalibration, running averages
during training (EMA, SWA), model soups."""

from trainwell.averaging.running import EMA, SWA
from trainwell.averaging.soups import greedy_soup, uniform_soup
from trainwell.averaging.weights import average_weights, update_bn
