"""The data side of the study: how much a corpus can teach, in bits.

- :mod:`~toolkit.entropy.estimators`: plug-in and Miller-Madow entropies, conditional
  entropies of every context order, the lzma compression rate;
- :mod:`~toolkit.entropy.rate`: the entropy rate as a point estimate inside an interval
  (plateau of the conditional entropies, held-out cross-entropy, PPMd);
- :mod:`~toolkit.entropy.profile`: the profile a token store records (all of the above for
  one corpus x tokenizer), written by ``prepare`` and read by the analysis.

Each module imports only the ones listed before it.
"""

from toolkit.entropy.estimators import (
    RELIABLE_SAMPLES_PER_OUTCOME,
    compression_bits_per_symbol,
    conditional_entropies,
    miller_madow_bits,
    plugin_entropy_bits,
)
from toolkit.entropy.profile import PROFILE_FORMAT, RATE_MAX_TOKENS, entropy_profile
from toolkit.entropy.rate import entropy_rate, rate_view

__all__ = ["PROFILE_FORMAT", "RATE_MAX_TOKENS", "RELIABLE_SAMPLES_PER_OUTCOME", "compression_bits_per_symbol",
           "conditional_entropies", "entropy_profile", "entropy_rate", "miller_madow_bits",
           "plugin_entropy_bits", "rate_view"]
