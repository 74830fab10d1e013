"""Recipe schema of the ``data`` and ``train`` sections, as the trainer reads it.

Defined in :mod:`dynvit.recipe_sections` (the recipe layer owns the schema,
so loading a recipe imports no engine); re-exported here.
"""

from __future__ import annotations

from dynvit.recipe_sections import (
    DATA_CHECKS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIXED_PRECISION,
    TRAIN_CHECKS,
    DataConfig,
    TrainConfig,
)

__all__ = [
    "DATA_CHECKS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MIXED_PRECISION",
    "TRAIN_CHECKS",
    "DataConfig",
    "TrainConfig",
]
