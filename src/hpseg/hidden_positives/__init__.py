"""Hidden Positives: the contrastive objective of HP (docs/method.md §3–7), as pure tensor functions.

Vocabulary: ``B`` images, ``S×S`` patches each, ``N = B·S²`` patches in the batch (rows
ordered image by image, row-major inside an image), ``F`` backbone width, ``D`` head width,
``P`` reference-pool size.

* :mod:`~hpseg.hidden_positives.pools` — pool entries and per-patch thresholds (§3);
* :mod:`~hpseg.hidden_positives.masks` — task-agnostic / task-specific positives (§4);
* :mod:`~hpseg.hidden_positives.loss` — the GHP + LHP contrastive loss and the λ schedule (§5);
* :mod:`~hpseg.hidden_positives.local` — LHP attention-weighted 3×3 propagation (§6);
* :mod:`~hpseg.hidden_positives.consistency` — the photometric consistency loss (§7).
"""

from hpseg.hidden_positives.consistency import consistency_loss
from hpseg.hidden_positives.local import (
    LHP_QUANTILES,
    local_propagation,
    neighbourhood_counts,
    neighbourhood_mask,
)
from hpseg.hidden_positives.loss import (
    BASE_TEMPERATURE,
    DEFAULT_CHUNK_IMAGES,
    hidden_positive_loss,
    lambda_schedule,
)
from hpseg.hidden_positives.masks import PositiveMasks, positive_masks
from hpseg.hidden_positives.pools import pool_thresholds, sample_pool, sample_pool_entries

__all__ = [
    "BASE_TEMPERATURE",
    "DEFAULT_CHUNK_IMAGES",
    "LHP_QUANTILES",
    "PositiveMasks",
    "consistency_loss",
    "hidden_positive_loss",
    "lambda_schedule",
    "local_propagation",
    "neighbourhood_counts",
    "neighbourhood_mask",
    "pool_thresholds",
    "positive_masks",
    "sample_pool",
    "sample_pool_entries",
]
