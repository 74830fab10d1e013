"""FLOPs of a pipeline's stages, counted by running them under ``torch.utils.flop_counter``.

Nothing here is a formula: each stage is executed once under
``FlopCounterMode`` (matrix products, convolutions and fused attention,
including the class-attention rows stage 1 computes for region selection),
so any plugin is counted as it really runs. Figures follow the fvcore
convention the LF-ViT and DeiT papers use: one multiply-add is one FLOP,
i.e. half of what ``FlopCounterMode`` reports. Element-wise work
(softmax, activations, normalisation, interpolation, top-k) is not counted;
fvcore also counts LayerNorm and interpolation, which adds about 0.2% for
DeiT-S (0.01 G of 4.6 G).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from dynvit.pipeline import DynamicPipeline


def _count_cpu_fused_attention() -> None:
    """Older PyTorch (2.11 and before) has no formula for the CPU's fused attention and counts it as 0 FLOPs.

    Measured on torch 2.11: the tiny test model's full-resolution count was 23% low (attention missing).
    Give that op the formula PyTorch uses for the other fused attention kernels.
    """
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _flash_attention_for_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_count_cpu_fused_attention()

CONVENTION = "GFLOPs, fvcore convention (1 multiply-add = 1 FLOP)"


@dataclass(frozen=True)
class FlopsReport:
    """GFLOPs per image (fvcore convention) of each part of a pipeline."""

    stage1: float  # downsampling + stage-1 backbone incl. class-attention rows; the whole model if one-stage
    stage2: float  # selection + embedding of the selected patches + fusion + reuse + stage-2 backbone; 0 if one-stage
    full_resolution: float  # the plain backbone on the whole full-resolution image
    stage2_length: int  # tokens stage 2 processes, CLS included

    def expected(self, exit_fraction: float) -> float:
        """Average GFLOPs per image when ``exit_fraction`` of the images stop after stage 1."""
        if not 0.0 <= exit_fraction <= 1.0:
            raise ValueError(f"exit fraction must be in [0, 1], got {exit_fraction}")
        return self.stage1 + (1.0 - exit_fraction) * self.stage2


def _gflops(run: Callable[[], object], batch: int) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 2 / batch / 1e9  # multiply-adds per image, in G


@torch.no_grad()
def count_flops(pipe: DynamicPipeline, batch: int = 1) -> FlopsReport:
    """Count each stage of ``pipe`` in eval mode on ``batch`` random images of the recipe's size.

    Runs wherever the pipeline's parameters are (the CPU is the reference:
    counts do not depend on the device). Stage 2 is counted on every image,
    as if none had exited, with the pipeline's current selection setting
    (``whole_image_stage2`` included).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    parameter = next(pipe.parameters())
    images = torch.randn(batch, 3, pipe.image_size, pipe.image_size, device=parameter.device, dtype=parameter.dtype)
    was_training = pipe.training
    pipe.eval()
    try:
        full = _gflops(lambda: pipe.run_full_resolution(images), batch)
        if pipe.num_stages == 1:
            return FlopsReport(stage1=full, stage2=0.0, full_resolution=full, stage2_length=pipe.stage2_length)
        stage1_out: list = []
        stage1 = _gflops(lambda: stage1_out.append(pipe.run_stage1(images)), batch)
        stage2 = _gflops(lambda: pipe.run_stage2(images, stage1_out[0], pipe.select(stage1_out[0])), batch)
        return FlopsReport(stage1=stage1, stage2=stage2, full_resolution=full, stage2_length=pipe.stage2_length)
    finally:
        pipe.train(was_training)
