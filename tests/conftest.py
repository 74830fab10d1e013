"""Shared fixtures: tiny models so the suite runs in minutes on two CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynvit import build_pipeline, load_recipe

TINY_RECIPE = Path(__file__).with_name("tiny.yaml")
# the same shrinking as command-line overrides of the quickstart recipe
TINY = [
    "model.backbone.depth=4",
    "model.backbone.embed_dim=32",
    "model.backbone.num_heads=2",
    "model.selector.first_block=2",
]


def tiny_recipe(*overrides: str):
    """The quickstart LF-ViT shrunk further: 64x64 images, patch 8, width 32, 4 blocks."""
    return load_recipe(TINY_RECIPE, list(overrides))


@pytest.fixture
def tiny_pipeline():
    torch.manual_seed(0)
    return build_pipeline(tiny_recipe()).eval()


@pytest.fixture
def images():
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
