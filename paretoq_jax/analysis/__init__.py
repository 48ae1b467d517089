"""Pure analysis functions for ParetoQ-style comparisons across bit-widths.

- :mod:`.pareto`: the Pareto frontier of (model size, quality) points (paper Fig. 1).
- :mod:`.size`: a quantized model's size in bits (quantized layers at their bit-width, the float
  parts at 16 bits).
- :mod:`.transition`: the "learning transition" numbers (paper Sec. 2.2): relative L1 movement
  of the float weights from their start and the fraction of integer codes changed.
"""

from .pareto import pareto_frontier
from .size import ModelSize, bits_per_weight, model_size, model_size_bits
from .transition import TransitionStats, code_change_fraction, relative_l1, transition_stats

__all__ = [
    "ModelSize",
    "TransitionStats",
    "bits_per_weight",
    "code_change_fraction",
    "model_size",
    "model_size_bits",
    "pareto_frontier",
    "relative_l1",
    "transition_stats",
]
