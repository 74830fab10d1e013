"""The accuracy / FLOPs curve of a two-stage model over exit thresholds, from recorded outputs.

Every image has both stages' logits, so the prediction at a threshold eta is
stage 1's where the image exits and stage 2's elsewhere. The sweep is one
(thresholds x images) boolean matrix: no model runs and no loop over images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dynvit.evaluation.records import Records
from dynvit.stages import ExitPolicy


def eta_grid(step: float = 0.01) -> Tensor:
    """Thresholds 0, step, ..., 1 (float64); ``step`` must divide 1."""
    if not 0 < step <= 1:
        raise ValueError(f"eval.eta_step must be in (0, 1], got {step}")
    n = round(1 / step)
    if abs(n * step - 1) > 1e-9:
        raise ValueError(f"eval.eta_step must divide 1 (0.01, 0.02, 0.05, ...), got {step}")
    return torch.arange(n + 1, dtype=torch.float64) / n


def exit_decisions(logits1: Tensor, etas: Tensor, policy: ExitPolicy | None = None) -> Tensor:
    """(T, N) bool: whether each of N images exits after stage 1 at each of T thresholds.

    Without ``policy``: the paper's rule, max softmax probability >= eta, as one
    broadcast comparison. A policy that exposes ``score(logits) -> (N,)`` (exit
    when score >= eta) is broadcast the same way; any other policy is asked
    once per threshold, each call covering every image.
    """
    score_fn = getattr(policy, "score", None)
    if policy is None or callable(score_fn):
        scores = logits1.float().softmax(dim=-1).amax(dim=-1) if policy is None else score_fn(logits1)
        # compare in the scores' precision, as the policy does with a Python float threshold
        return scores.unsqueeze(0) >= etas.to(scores.dtype).unsqueeze(1)
    return torch.stack([policy(logits1, float(eta)).to(torch.bool).cpu() for eta in etas])


@dataclass
class Curve:
    """Dynamic accuracy, exit fraction and expected cost at each threshold (all (T,) float64)."""

    eta: Tensor
    top1: Tensor  # fraction of images in [0, 1]
    top5: Tensor | None  # None when the model has fewer than 5 classes
    exit_fraction: Tensor  # fraction of images that stop after stage 1
    gflops: Tensor  # expected GFLOPs per image: stage 1 + (1 - exit_fraction) * stage 2
    count: int  # images the figures are computed on

    def index(self, eta: float) -> int:
        """Grid position of the threshold nearest ``eta``."""
        return int((self.eta - eta).abs().argmin())

    def point(self, i: int) -> dict[str, float | int | None]:
        return {
            "eta": round(float(self.eta[i]), 6),
            "count": self.count,
            "top1": float(self.top1[i]),
            "top5": None if self.top5 is None else float(self.top5[i]),
            "exit_fraction": float(self.exit_fraction[i]),
            "gflops": float(self.gflops[i]),
        }


def sweep(
    records: Records,
    stage1_gflops: float,
    stage2_gflops: float,
    etas: Tensor | None = None,
    policy: ExitPolicy | None = None,
    exits: Tensor | None = None,
) -> Curve:
    """The curve of a two-stage model over ``etas`` (default: 0 to 1 in steps of 0.01).

    ``exits`` (T, N) may be given when already computed (see :func:`exit_decisions`).
    """
    if records.num_stages != 2:
        raise ValueError(f"a threshold sweep needs a two-stage model, these records have {records.num_stages} stage")
    etas = eta_grid() if etas is None else torch.as_tensor(etas, dtype=torch.float64)
    if exits is None:
        exits = exit_decisions(records.logits[0], etas, policy)

    def dynamic_accuracy(k: int) -> Tensor:
        correct1, correct2 = records.correct(1, k), records.correct(2, k)
        return torch.where(exits, correct1.unsqueeze(0), correct2.unsqueeze(0)).double().mean(dim=1)

    exit_fraction = exits.double().mean(dim=1)
    return Curve(
        eta=etas,
        top1=dynamic_accuracy(1),
        top5=dynamic_accuracy(5) if records.num_classes >= 5 else None,
        exit_fraction=exit_fraction,
        gflops=stage1_gflops + (1 - exit_fraction) * stage2_gflops,
        count=records.count,
    )
