"""Recipe schema of the ``data`` and ``train`` sections."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where images come from and how they are prepared."""

    source: str = "quickstart"  # quickstart | imagefolder | disk
    path: str | None = None
    train_split: str = "train"
    val_split: str = "validation"
    num_workers: int = 2


@dataclass
class TrainConfig:
    """Optimisation settings; DeiT's defaults where the paper follows DeiT."""

    epochs: int = 1
    batch_size: int = 64
    seed: int = 0
    full_image_epochs: int = 0
    output_dir: str = "runs/default"
