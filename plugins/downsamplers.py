"""Downsampler plugins: how the stage-1 (localisation) input is made."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dynvit.registry import register
from dynvit.stages import Downsampler


@register("downsampler", "bilinear")
class InterpolateDownsampler(Downsampler):
    """Resize by ``scale`` with ``F.interpolate``; LF-ViT uses bilinear x0.5, align_corners=True."""

    def __init__(self, scale: float = 0.5, mode: str = "bilinear", align_corners: bool = True) -> None:
        super().__init__()
        if not 0 < scale <= 1:
            raise ValueError(f"downsampler scale must be in (0, 1], got {scale}")
        if mode not in ("bilinear", "bicubic", "nearest", "area"):
            raise ValueError(f"unknown interpolation mode {mode!r}; use bilinear, bicubic, nearest or area")
        self.scale = scale
        self.mode = mode
        self.align_corners = align_corners if mode in ("bilinear", "bicubic") else None

    def output_size(self, size: int) -> int:
        return int(round(size * self.scale))

    def forward(self, images: Tensor) -> Tensor:
        size = (self.output_size(images.shape[-2]), self.output_size(images.shape[-1]))
        return F.interpolate(images, size=size, mode=self.mode, align_corners=self.align_corners)


@register("downsampler", "avgpool")
class AvgPoolDownsampler(Downsampler):
    """Average non-overlapping ``factor`` x ``factor`` pixel blocks (a box filter, no aliasing)."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"avgpool factor must be >= 1, got {factor}")
        self.factor = factor

    def output_size(self, size: int) -> int:
        if size % self.factor:
            raise ValueError(f"image size {size} is not divisible by the avgpool factor {self.factor}")
        return size // self.factor

    def forward(self, images: Tensor) -> Tensor:
        return F.avg_pool2d(images, self.factor)
