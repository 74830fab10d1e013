"""Training losses over the logits of every stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from dynvit.registry import register
from dynvit.stages import Loss


def cross_entropy(logits: Tensor, target: Tensor, smoothing: float = 0.0) -> Tensor:
    """CE against hard labels (B,) or soft targets (B, C), e.g. from mixup/cutmix."""
    if target.ndim == 2:
        return F.cross_entropy(logits.float(), target.float())
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


@register("loss", "ce")
class LastStageCE(Loss):
    """CE on the last stage only (plain backbones)."""

    def __init__(self, smoothing: float = 0.0) -> None:
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: Sequence[Tensor], target: Tensor) -> Tensor:
        return cross_entropy(logits[-1], target, self.smoothing)


@register("loss", "ce_kl")
class CEPlusKL(Loss):
    """LF-ViT's Eq. 12: CE(stage 2, y) + KL(stage 1 || stage 2 detached), batch mean."""

    def __init__(self, smoothing: float = 0.0, kl_weight: float = 1.0) -> None:
        super().__init__()
        self.smoothing = smoothing
        self.kl_weight = kl_weight

    def forward(self, logits: Sequence[Tensor], target: Tensor) -> Tensor:
        first, last = logits[0].float(), logits[-1].float()
        ce = cross_entropy(last, target, self.smoothing)
        kl = F.kl_div(first.log_softmax(-1), last.detach().softmax(-1), reduction="batchmean")
        return ce + self.kl_weight * kl


@register("loss", "ce_ce")
class CEPlusCE(Loss):
    """Table 7's alternative: both stages supervised by the labels."""

    def __init__(self, smoothing: float = 0.0) -> None:
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: Sequence[Tensor], target: Tensor) -> Tensor:
        return sum(cross_entropy(stage, target, self.smoothing) for stage in logits)
