"""Recipe schema of the ``eval`` section."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    """How a checkpoint is evaluated."""

    batch_size: int = 128
