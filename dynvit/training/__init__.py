"""Training through Accelerate: ``train(recipe)`` and its checkpoints.

Names are imported on first use, so importing the package (or one of its
light modules) does not pull in Accelerate and timm's training parts.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train": "dynvit.training.trainer",
    "TrainingError": "dynvit.training.trainer",
    "load_checkpoint_weights": "dynvit.training.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dynvit.training' has no attribute {name!r}")
