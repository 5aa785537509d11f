"""The analysis: every run's measures from its done members, reduced into ``summary.zarr``.

One module per measure family, each computing one run's results from its members' stores:

- :mod:`.distributions`: output distributions (entropy, KL, perplexity, accuracy, JS
  distance, argmax agreement) and the counting baseline;
- :mod:`.embeddings`: static and contextual embeddings, every member pair;
- :mod:`.fisher`: Fisher shares per group, block and over the flow; per-token Fisher and
  seed agreement from the stored diagonals;
- :mod:`.training`: the weight-distance check and the loss curves;
- :mod:`.profile`: the data-side entropy profile of the run's token store;

and the stage's plumbing: :mod:`.common` (definitions, mean/std, bootstrap intervals),
:mod:`.shards` (the ``measure`` units: one shard store per run and family) and
:mod:`.summary` (the ``analyse`` unit: shards or in-process results onto the summary's
coordinates). Definitions: docs/methods.md.
"""

from toolkit.analyse.shards import FAMILIES, run_shard
from toolkit.analyse.summary import analyse_study, complete_members

__all__ = ["FAMILIES", "analyse_study", "complete_members", "run_shard"]
