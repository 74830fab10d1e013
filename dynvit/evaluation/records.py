"""One pass over the evaluation data that keeps every image's per-stage outputs.

Thresholds are then swept on these records without running the model again.
The training-mode forward is used (every image through every stage), so an
image that would exit at stage 1 still has every later stage's prediction,
and the region the refining stage would have looked at.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dynvit.pipeline import DynamicPipeline


@dataclass
class Records:
    """Per-image outputs of every stage, on the CPU in data order.

    Logits are kept rather than probabilities: the softmax outputs follow
    exactly from them (:meth:`probs`), and exit policies take logits.
    """

    logits: tuple[Tensor, ...]  # one (N, C) float32 tensor per stage
    labels: Tensor  # (N,) int64
    region: Tensor | None = None  # (N, 4) (row, col, h, w) on the grid before the refining stage; None without one
    kept: Tensor | None = None  # (N, K) cells of that grid computed at the refining stage's resolution
    images: Tensor | None = None  # (P, 3, S, S) the first P images as loaded (normalised), for pictures
    scores: tuple[Tensor, ...] | None = None  # per exit, (N,) the exit policy's score (exit when >= threshold)

    @property
    def count(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.logits[0].shape[1])

    @property
    def num_stages(self) -> int:
        return len(self.logits)

    def probs(self, stage: int) -> Tensor:
        """Softmax output of ``stage`` (1-based): (N, C)."""
        return self.logits[stage - 1].softmax(dim=-1)

    def correct(self, stage: int, k: int = 1) -> Tensor:
        """(N,) bool: the label is among the ``k`` highest scores of ``stage``."""
        return topk_correct(self.logits[stage - 1], self.labels, k)

    def subset(self, index: Tensor) -> Records:
        """The records of the images at ``index`` (pictures are not carried over)."""
        return Records(
            logits=tuple(x[index] for x in self.logits),
            labels=self.labels[index],
            region=None if self.region is None else self.region[index],
            kept=None if self.kept is None else self.kept[index],
            scores=None if self.scores is None else tuple(x[index] for x in self.scores),
        )

    def exit_scores(self) -> tuple[Tensor, ...]:
        """Every exit's scores, one (N,) tensor per exit."""
        if self.scores is None or len(self.scores) != self.num_stages - 1:
            raise ValueError("these records have no exit scores; record them with collect_records")
        return self.scores


def topk_correct(logits: Tensor, labels: Tensor, k: int = 1) -> Tensor:
    """(N,) bool: ``labels`` among the top ``k`` of ``logits`` (N, C); needs ``k <= C``."""
    if k > logits.shape[-1]:
        raise ValueError(f"top-{k} needs at least {k} classes, the model has {logits.shape[-1]}")
    top = logits.topk(k, dim=-1).indices
    return (top == labels.unsqueeze(-1)).any(dim=-1)


@torch.no_grad()
def collect_records(
    pipe: DynamicPipeline,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str | None = None,
    keep_images: int = 0,
    progress: bool = True,
    total: int | None = None,
    description: str = "evaluating",
) -> Records:
    """Run ``pipe`` (in eval mode, no grad) over ``(images, labels)`` batches and keep everything per image.

    ``keep_images``: how many of the first images to keep for pictures.
    ``total``: number of batches, for the progress bar when ``batches`` has no length.
    """
    device = torch.device(device) if device is not None else next(pipe.parameters()).device
    was_training = pipe.training
    pipe.eval()
    logits: list[list[Tensor]] = [[] for _ in range(pipe.num_stages)]
    scores: list[list[Tensor]] = [[] for _ in range(pipe.num_stages - 1)]
    labels, regions, kept, images = [], [], [], []
    kept_so_far = 0
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    try:
        for batch_images, batch_labels in tqdm(batches, total=total, desc=description, disable=not progress):
            output = pipe(batch_images.to(device, non_blocking=True))
            for stage, stage_logits in enumerate(output.logits):
                logits[stage].append(stage_logits.float().cpu())
                if stage < pipe.num_stages - 1:  # scored where the model runs, as pipe.infer scores
                    scores[stage].append(pipe.stages[stage].exit_policy.score(stage_logits).cpu())
            labels.append(batch_labels.cpu().long())
            if output.selection is not None:
                regions.append(output.selection.region.cpu())
                kept.append(output.selection.kept.cpu())
            if kept_so_far < keep_images:
                take = batch_images[: keep_images - kept_so_far].cpu()
                images.append(take)
                kept_so_far += take.shape[0]
    finally:
        pipe.train(was_training)
    if not labels:
        raise ValueError("the evaluation data yielded no images; check the split name and --limit")
    return Records(
        logits=tuple(torch.cat(x) for x in logits),
        labels=torch.cat(labels),
        region=torch.cat(regions) if regions else None,
        kept=torch.cat(kept) if kept else None,
        images=torch.cat(images) if images else None,
        scores=tuple(torch.cat(x) for x in scores) if scores else None,
    )
