"""Exit policies: which samples stop after stage 1."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dynvit.registry import register
from dynvit.stages import ExitPolicy


@register("exit_policy", "confidence")
class ConfidenceExit(ExitPolicy):
    """Exit when the max softmax probability is >= ``threshold`` (the paper's eta)."""

    def __init__(self, threshold: float = 0.76) -> None:
        super().__init__()
        self.threshold = threshold

    def score(self, logits: Tensor) -> Tensor:
        return logits.float().softmax(dim=-1).amax(dim=-1)


@register("exit_policy", "entropy")
class EntropyExit(ExitPolicy):
    """Exit when certainty, 1 - H(p) / log C, is >= ``threshold`` (higher threshold: fewer exits)."""

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold

    def score(self, logits: Tensor) -> Tensor:
        log_p = logits.float().log_softmax(dim=-1)
        entropy = -(log_p.exp() * log_p).sum(dim=-1)
        return 1 - entropy / math.log(logits.shape[-1])


@register("exit_policy", "never")
class NeverExit(ExitPolicy):
    """Every sample goes to stage 2 (how LF-ViT trains, eta = 1)."""

    threshold = 1.0

    def score(self, logits: Tensor) -> Tensor:
        return torch.full((logits.shape[0],), -math.inf, device=logits.device)
