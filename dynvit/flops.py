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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from dynvit.pipeline import DynamicPipeline
from dynvit.stages import StageOutput


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
    """GFLOPs per image (fvcore convention) of each stage of a pipeline.

    ``stages[k]`` is what an image that reaches stage ``k + 1`` pays for it
    (for a refining stage: selection, embedding of the selected patches,
    fusion, reuse and its backbone); a one-stage model's single entry is the
    whole model. ``stage1``, ``stage2`` and ``stage2_length`` are the
    two-stage names.
    """

    stages: tuple[float, ...]  # GFLOPs of each stage, in order
    full_resolution: float  # the plain shared backbone on the whole full-resolution image
    lengths: tuple[int, ...]  # tokens each stage processes, CLS included
    block_lengths: tuple[tuple[int, ...], ...] = ()  # per stage, tokens leaving each block (token reduction)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def stage1(self) -> float:
        """Downsampling + stage-1 backbone incl. class-attention rows; the whole model if one-stage."""
        return self.stages[0]

    @property
    def stage2(self) -> float:
        """The second and last stage of a two-stage pipeline; 0 if one-stage."""
        if self.num_stages > 2:
            raise ValueError(
                f"stage2 names the last stage of a two-stage pipeline; this one has {self.num_stages}: "
                "read report.stages"
            )
        return self.stages[1] if self.num_stages == 2 else 0.0

    @property
    def stage2_length(self) -> int:
        """Tokens the last stage processes, CLS included."""
        return self.lengths[-1]

    def cumulative(self, stage: int) -> float:
        """GFLOPs of an image that stops after ``stage`` (1-based): every stage up to it."""
        return sum(self.stages[:stage])

    def expected(self, exit_fractions: float | Sequence[float]) -> float:
        """Average GFLOPs per image when ``exit_fractions[k]`` of all images stop at exit ``k + 1`` (after stage
        ``k + 1``); one number per exit (a single number for a two-stage pipeline). The fraction that reaches
        stage ``k`` pays stage ``k``.
        """
        fractions = [exit_fractions] if isinstance(exit_fractions, (int, float)) else list(exit_fractions)
        exits = max(self.num_stages - 1, 1)
        if len(fractions) != exits:
            raise ValueError(f"give one exit fraction per exit ({exits}), got {len(fractions)}")
        if any(not 0.0 <= f <= 1.0 for f in fractions):
            raise ValueError(f"exit fraction must be in [0, 1], got {fractions}")
        if sum(fractions) > 1.0 + 1e-9:
            raise ValueError(f"exit fractions are shares of all images and must add up to at most 1, got {fractions}")
        total, reaching = self.stages[0], 1.0
        for fraction, cost in zip(fractions, self.stages[1:]):
            reaching -= fraction
            total += max(reaching, 0.0) * cost
        return total


def gflops_per_image(run: Callable[[], object], batch: int) -> float:
    """Multiply-adds per image, in G, of everything ``run`` computes on a batch of ``batch``."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 2 / batch / 1e9  # multiply-adds per image, in G


@torch.no_grad()
def count_flops(pipe: DynamicPipeline, batch: int = 1) -> FlopsReport:
    """Count each stage of ``pipe`` in eval mode on ``batch`` random images of the recipe's size.

    Runs wherever the pipeline's parameters are (the CPU is the reference:
    counts do not depend on the device). Each stage is counted with
    ``pipe.run_stage`` on every image, as if none had exited, from the
    previous stage's output, with the pipeline's current selection setting
    (``whole_image_stage2`` included).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    parameter = next(pipe.parameters())
    images = torch.randn(batch, 3, pipe.image_size, pipe.image_size, device=parameter.device, dtype=parameter.dtype)
    was_training = pipe.training
    pipe.eval()
    try:
        full = gflops_per_image(lambda: pipe.run_full_resolution(images), batch)
        lengths = tuple(pipe.stage_length(i) for i in range(pipe.num_stages))
        block_lengths = tuple(pipe.block_lengths(i) for i in range(pipe.num_stages))
        # stage by stage, each on every image (as if none had exited), from the previous stage's output;
        # a one-stage model's stage is the model as it runs (token reduction included), not the plain backbone
        outputs: list[StageOutput] = []
        stages = []
        for index in range(pipe.num_stages):
            previous = outputs[-1] if outputs else None
            stages.append(gflops_per_image(lambda: outputs.append(pipe.run_stage(index, images, previous)), batch))  # noqa: B023
        return FlopsReport(stages=tuple(stages), full_resolution=full, lengths=lengths, block_lengths=block_lengths)
    finally:
        pipe.train(was_training)
