"""One home for every figure lmpress measures on a model: bytes, divergence, time.

Each quantity has exactly one function, so the search's prediction, the stage's measurement and
the serving report cannot disagree on what a byte or a nat is.
"""

from lmpress.measure.divergence import Divergence, divergence, kl_per_position, log_probs, nll_sum
from lmpress.measure.memory import cache_bytes, kv_bytes, weight_bytes
from lmpress.measure.timing import Clock, Timer

__all__ = [
    "Clock",
    "Divergence",
    "Timer",
    "cache_bytes",
    "divergence",
    "kl_per_position",
    "kv_bytes",
    "log_probs",
    "nll_sum",
    "weight_bytes",
]
