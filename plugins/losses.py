"""Training losses over the logits of every stage."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dynvit.registry import register
from dynvit.stages import Loss, PipelineOutput


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

    def forward(self, output: PipelineOutput, target: Tensor) -> Tensor:
        return cross_entropy(output.stages[-1].logits, target, self.smoothing)


@register("loss", "ce_kl")
class CEPlusKL(Loss):
    """LF-ViT's Eq. 12 (and CF-ViT's loss): CE(last stage, y) + KL(stage || last stage detached), batch mean.

    With more than two stages every earlier stage is distilled from the last one.
    """

    def __init__(self, smoothing: float = 0.0, kl_weight: float = 1.0) -> None:
        super().__init__()
        self.smoothing = smoothing
        self.kl_weight = kl_weight

    def forward(self, output: PipelineOutput, target: Tensor) -> Tensor:
        *earlier, last = (logits.float() for logits in output.logits)
        teacher = last.detach().softmax(-1)
        loss = cross_entropy(last, target, self.smoothing)
        for logits in earlier:
            loss = loss + self.kl_weight * F.kl_div(logits.log_softmax(-1), teacher, reduction="batchmean")
        return loss


@register("loss", "ce_ce")
class CEPlusCE(Loss):
    """Table 7's alternative (and DVT's loss): every stage supervised by the labels, summed."""

    def __init__(self, smoothing: float = 0.0) -> None:
        super().__init__()
        self.smoothing = smoothing

    def forward(self, output: PipelineOutput, target: Tensor) -> Tensor:
        return sum(cross_entropy(logits, target, self.smoothing) for logits in output.logits)
