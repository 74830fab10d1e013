"""The accuracy / FLOPs curve of a dynamic model over exit thresholds, from recorded outputs.

Every image has every stage's logits, so the prediction at a threshold eta is
stage 1's where the image exits and stage 2's elsewhere. The two-stage sweep
is one (thresholds x images) boolean matrix: no model runs and no loop over
images. With more stages there is one threshold per exit; the sweep follows
DVT (and MSDNet): for each q the share of images meant to stop at stage k is
proportional to q**k, and each exit's threshold is found greedily among the
images that have not exited yet (:func:`dvt_sweep`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


# -- pipelines of three or more stages: one threshold per exit ------------------------------------------------


def q_grid(step: float = 0.05, stop: float = 2.0) -> Tensor:
    """DVT's sweep family: q = step, 2 * step, ... below ``stop`` (float64; default 0.05 ... 1.95)."""
    return torch.arange(1, round(stop / step), dtype=torch.float64) * step


def exit_proportions(q: float, num_stages: int) -> list[float]:
    """Share of the images meant to stop at each stage: proportional to q**k (k = 0 for the first stage)."""
    weights = [float(q) ** k for k in range(num_stages)]
    total = sum(weights)
    return [w / total for w in weights]


def greedy_thresholds(scores: Sequence[Tensor], proportions: Sequence[float]) -> Tensor:
    """(E,) float64 thresholds, one per exit, that stop ``proportions[k]`` of the images at exit ``k`` (MSDNet, DVT).

    Exit by exit, among the images that have not exited yet, the threshold
    is the score of the ``floor(N * proportions[k])``-th most certain of
    them (fewer if fewer remain), so that many stop there (more on ties);
    ``inf`` where none is meant to stop. One sort per exit, no loop over images.
    """
    count = scores[0].shape[0]
    remaining = torch.ones(count, dtype=torch.bool)
    thresholds = []
    for score, proportion in zip(scores, proportions):
        wanted = math.floor(count * proportion)
        candidates = score[remaining]
        if wanted == 0 or candidates.numel() == 0:
            threshold = math.inf
        else:
            threshold = float(candidates.topk(min(wanted, candidates.numel())).values[-1])
        thresholds.append(threshold)
        remaining &= ~(score >= threshold)
    return torch.tensor(thresholds, dtype=torch.float64)


def exit_stages(scores: Sequence[Tensor], thresholds: Tensor) -> Tensor:
    """(T, N) int64: the 1-based stage each image stops at under each of T rows of (T, E) thresholds.

    An image stops at the first exit whose score is >= its threshold (in the
    scores' precision, as the exit policies compare), else at the last stage.
    """
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1, len(scores))
    stage = torch.full((thresholds.shape[0], scores[0].shape[0]), len(scores) + 1, dtype=torch.long)
    for k in reversed(range(len(scores))):  # the earliest exit taken wins
        exits = scores[k].unsqueeze(0) >= thresholds[:, k].to(scores[k].dtype).unsqueeze(1)
        stage = torch.where(exits, k + 1, stage)
    return stage


def _threshold_or_none(value: float) -> float | None:
    return None if math.isinf(value) else value


@dataclass
class StagedCurve:
    """Dynamic accuracy and expected cost of a pipeline with several exits, at T rows of per-exit thresholds."""

    thresholds: Tensor  # (T, E) float64; inf: no image stops at that exit
    top1: Tensor  # (T,) fraction of images in [0, 1]
    top5: Tensor | None  # (T,) None when the model has fewer than 5 classes
    exit_fractions: Tensor  # (T, E) fraction of all images that stop at each exit
    gflops: Tensor  # (T,) expected GFLOPs per image: the fraction reaching stage k pays stage k
    count: int  # images the figures are computed on
    q: Tensor | None = None  # (T,) the sweep parameter each row was found for; None when the thresholds were given

    def point(self, i: int) -> dict[str, Any]:
        return {
            "q": None if self.q is None else round(float(self.q[i]), 6),
            "thresholds": [_threshold_or_none(t) for t in self.thresholds[i].tolist()],
            "count": self.count,
            "top1": float(self.top1[i]),
            "top5": None if self.top5 is None else float(self.top5[i]),
            "exit_fractions": self.exit_fractions[i].tolist(),
            "gflops": float(self.gflops[i]),
        }


def staged_points(
    records: Records, stage_gflops: Sequence[float], thresholds: Tensor, q: Tensor | None = None
) -> StagedCurve:
    """The dynamic model at each row of (T, E) per-exit ``thresholds``, from the records' exit scores."""
    stages = records.num_stages
    if stages < 2 or len(stage_gflops) != stages:
        raise ValueError(f"need one cost per stage ({stages}) and at least two stages, got {len(stage_gflops)} costs")
    stage = exit_stages(records.exit_scores(), thresholds) - 1  # (T, N) 0-based

    def dynamic_accuracy(k: int) -> Tensor:
        correct = torch.stack([records.correct(s, k) for s in range(1, stages + 1)])  # (S, N)
        return correct.gather(0, stage).double().mean(dim=1)

    exit_fractions = torch.stack([(stage == k).double().mean(dim=1) for k in range(stages - 1)], dim=1)
    gflops = torch.full((stage.shape[0],), float(stage_gflops[0]), dtype=torch.float64)
    for k in range(1, stages):
        gflops = gflops + (stage >= k).double().mean(dim=1) * float(stage_gflops[k])
    return StagedCurve(
        thresholds=torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1, stages - 1),
        top1=dynamic_accuracy(1),
        top5=dynamic_accuracy(5) if records.num_classes >= 5 else None,
        exit_fractions=exit_fractions,
        gflops=gflops,
        count=records.count,
        q=q,
    )


def dvt_sweep(records: Records, stage_gflops: Sequence[float], qs: Tensor | None = None) -> StagedCurve:
    """DVT's curve: for each q, per-exit thresholds found greedily on ``records`` for proportions ~ q**k."""
    qs = q_grid() if qs is None else torch.as_tensor(qs, dtype=torch.float64)
    scores = records.exit_scores()
    rows = [greedy_thresholds(scores, exit_proportions(float(q), records.num_stages)) for q in qs]
    return staged_points(records, stage_gflops, torch.stack(rows), q=qs)
