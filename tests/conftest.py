"""Shared fixtures: tiny models so the suite runs in minutes on two CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dynvit.plugins.backbones import cuda_tf32

from dynvit import build_pipeline, load_recipe
from dynvit.stages import PipelineOutput, StageOutput

TINY_RECIPE = Path(__file__).with_name("tiny.yaml")

# Tolerances for two computations of the same quantity (two code paths, two devices, or a reduced precision
# against float32), as assert_close arguments: |a - b| <= atol + rtol * |b|. Each is about three times the
# largest difference measured on the test models over 256 images (tests/test_numerics.py: the tiny model, and
# the same with attention sharpened and logits up to about 5, as training makes them):
# - float32, IEEE (unit roundoff u = 6e-8): two kernels differ only in summation order (<= 3e-6 on logits).
# - TF32 (10-bit mantissa for matmul/conv inputs, float32 accumulation, u = 4.9e-4): emulated bit for bit,
#   logits moved by <= 5.2e-3.
# - bfloat16 autocast (8-bit mantissa, u = 3.9e-3): logits moved by <= 5.8e-2.
# - float16 autocast (10-bit mantissa, float16 activations, u = 4.9e-4): logits moved by <= 7.5e-3.
TOLERANCES = {
    "float32": {"atol": 1e-5, "rtol": 1e-5},
    "tf32": {"atol": 1e-2, "rtol": 1e-2},
    "bfloat16": {"atol": 1e-1, "rtol": 1e-1},
    "float16": {"atol": 2e-2, "rtol": 2e-2},
}


def tf32_enabled(device: str | torch.device = "cpu") -> bool:
    """Whether float32 convolutions or matmuls on ``device`` may round their inputs to TF32.

    On CUDA, cuDNN convolutions use TF32 by default, cuBLAS matmuls when asked to (see ``cuda_tf32``).
    CPU kernels compute float32 in IEEE precision.
    """
    if torch.device(device).type != "cuda":
        return False
    return cuda_tf32("conv") or cuda_tf32("matmul")


def tolerance(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", tf32: bool | None = None
) -> dict[str, float]:
    """``atol``/``rtol`` for comparing results computed in ``dtype`` on ``device`` (TF32 as ``tf32``, or as set)."""
    if dtype in (torch.bfloat16, torch.float16):
        return dict(TOLERANCES[str(dtype).removeprefix("torch.")])
    if dtype != torch.float32:
        raise ValueError(f"no tolerance for {dtype}; use float32, bfloat16 or float16")
    return dict(TOLERANCES["tf32" if (tf32_enabled(device) if tf32 is None else tf32) else "float32"])


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


def as_output(*logits: torch.Tensor) -> PipelineOutput:
    """A pipeline output holding only these stage logits, as a loss receives it."""
    return PipelineOutput(tuple(StageOutput(logits=x, tokens=x[:, None], class_attention={}) for x in logits))
