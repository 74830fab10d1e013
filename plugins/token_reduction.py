"""Token reduction inside a stage's blocks: EViT's pruning and ToMe's merging, in any stage of any recipe.

Both act between a block's attention and its MLP, as their papers do, on
timm's own blocks (see ``TimmViT.encode``), and both keep shapes static:
the tokens leaving a block depend only on how many entered it.

* ``evit`` (Liang et al., "Not All Patches are What You Need", ICLR 2022):
  at a few blocks keep the patch tokens the CLS token attends to most and
  fuse the rest into one token, their sum weighted by that attention.
* ``tome`` (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023):
  in every chosen block merge ``r`` tokens by bipartite soft matching on the
  keys; merged tokens are size-weighted averages, and proportional
  attention adds log(size) to the attention logits so a merged token weighs
  as the tokens it stands for. Works on a trained model without training.

A selector downstream reads CLS attention over the original grid: a token
that holds s originals passes each 1/s of its attention (see
:class:`~dynvit.stages.TokenGroups`), and final tokens are spread back to
the grid positions they hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dynvit.registry import register
from dynvit.stages import BlockAttention, TokenGroups, TokenReducer, gather_tokens


def _positions(index: Tensor, length: int, fill: int) -> Tensor:
    """(B, K) distinct indices into ``length`` tokens -> (B, length) long: ``k`` at ``index[:, k]``, ``fill``
    elsewhere. Where each token lands when the ones at ``index`` are kept in that order."""
    out = index.new_full((index.shape[0], length), fill)
    return out.scatter_(1, index, torch.arange(index.shape[1], device=index.device).expand_as(index))


@register("token_reducer", "none")
class NoReduction(TokenReducer):
    """Every token through every block (the default)."""

    is_noop = True

    def reduces_at(self, block: int, depth: int) -> bool:
        return False

    def reduced_length(self, length: int, block: int) -> int:
        return length

    def forward(self, x: Tensor, attention: BlockAttention, groups: TokenGroups, block: int):
        return x, groups


class _AtBlocks(TokenReducer):
    """A reducer acting in a chosen set of blocks."""

    def __init__(self, blocks: Sequence[int] | None, stage: int | Sequence[int]) -> None:
        super().__init__(stage)
        self.blocks = None if blocks is None else [int(b) for b in blocks]
        if self.blocks is not None and any(b < 0 for b in self.blocks):
            raise ValueError(f"blocks are 0-based block indices, got {self.blocks}")

    def default_blocks(self, depth: int) -> list[int]:
        return list(range(depth))

    def chosen_blocks(self, depth: int) -> list[int]:
        blocks = self.default_blocks(depth) if self.blocks is None else self.blocks
        if any(b >= depth for b in blocks):
            raise ValueError(f"blocks {blocks} reach beyond the backbone's {depth} blocks (0-based)")
        return blocks

    def reduces_at(self, block: int, depth: int) -> bool:
        return block in self.chosen_blocks(depth)


@register("token_reducer", "evit")
class EViT(_AtBlocks):
    """EViT: keep ``ceil(keep_rate * L)`` attentive patch tokens at each chosen block; with ``fuse``, the
    inattentive rest become one extra token, their sum weighted by the CLS attention each received.

    ``blocks`` default to the paper's DeiT placement scaled to the depth:
    blocks 3, 6 and 9 of 12 (0-based), i.e. at a quarter, half and three
    quarters of the depth.

    Training from scratch, the authors keep every token for the first
    ``shrink_start_epoch`` epochs, then lower the keep rate from 1 to
    ``keep_rate`` along a half cosine over ``shrink_epochs`` epochs, step by
    step (their DeiT-S run: 10 and 100 of 300); fine-tuning, both are 0 and
    the rate is fixed. The schedule reads the training progress the trainer
    hands every module (:meth:`set_training_progress`); in eval mode, or
    with no progress given, the rate is ``keep_rate``.
    """

    reads_class_attention = True

    def __init__(
        self,
        keep_rate: float = 0.7,
        blocks: Sequence[int] | None = None,
        fuse: bool = True,
        shrink_start_epoch: float = 0,
        shrink_epochs: float = 0,
        stage: int | Sequence[int] = -1,
    ) -> None:
        super().__init__(blocks, stage)
        if not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        if shrink_start_epoch < 0 or shrink_epochs < 0:
            raise ValueError(
                f"shrink_start_epoch and shrink_epochs are epoch counts >= 0, got {shrink_start_epoch}, {shrink_epochs}"
            )
        self.keep_rate = float(keep_rate)
        self.fuse = bool(fuse)
        self.shrink_start_epoch, self.shrink_epochs = float(shrink_start_epoch), float(shrink_epochs)
        self.epochs_done: float | None = None  # training progress in epochs, from set_training_progress

    def set_training_progress(self, epochs: float) -> None:
        """How far training has come, in epochs (3.25: a quarter into the fourth epoch)."""
        self.epochs_done = float(epochs)

    @property
    def current_keep_rate(self) -> float:
        """The keep rate this forward uses: ``keep_rate``, or the shrink schedule's while training."""
        start, span, progress = self.shrink_start_epoch, self.shrink_epochs, self.epochs_done
        if not self.training or progress is None or progress >= start + span:
            return self.keep_rate
        if progress < start:
            return 1.0
        return self.keep_rate + (1.0 - self.keep_rate) * (math.cos(math.pi * (progress - start) / span) + 1) / 2

    def default_blocks(self, depth: int) -> list[int]:
        return sorted({depth // 4, depth // 2, 3 * depth // 4})

    def kept(self, length: int) -> int:
        return math.ceil(self.current_keep_rate * length)

    def reduced_length(self, length: int, block: int) -> int:
        keep = self.kept(length)
        return length if keep >= length else keep + int(self.fuse)

    def forward(self, x: Tensor, attention: BlockAttention, groups: TokenGroups, block: int):
        patches = x[:, 1:]
        length = patches.shape[1]
        keep = self.kept(length)
        if keep >= length:
            return x, groups
        weights = attention.class_attention
        top = weights.topk(keep, dim=1).indices  # (B, keep), most attended first
        kept = gather_tokens(patches, top)
        # the rest land on slot ``keep``: the fused token, or (without fusion) the dropped mark
        position = _positions(top, length, fill=keep)
        if self.fuse:
            # the inattentive tokens' attention-weighted sum; the kept ones weigh zero in it
            inattentive = weights * (position == keep)
            fused = torch.einsum("bl,bld->bd", inattentive.to(x.dtype), patches)
            kept = torch.cat([kept, fused.unsqueeze(1)], dim=1)
        return torch.cat([x[:, :1], kept], dim=1), groups.regroup(position, keep + int(self.fuse))


@register("token_reducer", "tome")
class ToMe(_AtBlocks):
    """ToMe: merge ``r`` patch tokens in every chosen block (default: all) by bipartite soft matching.

    The patch tokens alternate between two sets; each token of the first
    set finds its most similar token of the second (cosine similarity of
    the head-mean keys), and the ``r`` best-matched pairs merge into the
    second set's token as a size-weighted average. ``r`` is one number for
    every chosen block or one per block of the backbone; it never exceeds
    half the patch tokens. CLS is never merged.
    """

    reads_keys = True

    def __init__(
        self,
        r: int | Sequence[int] = 8,
        blocks: Sequence[int] | None = None,
        proportional_attention: bool = True,
        stage: int | Sequence[int] = -1,
    ) -> None:
        super().__init__(blocks, stage)
        self.r = int(r) if isinstance(r, int) else [int(v) for v in r]
        if min([self.r] if isinstance(self.r, int) else self.r, default=0) < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        self.proportional_attention = bool(proportional_attention)

    def reduces_at(self, block: int, depth: int) -> bool:
        if not isinstance(self.r, int) and len(self.r) != depth:
            raise ValueError(f"r gives {len(self.r)} values; give one number or one per block ({depth})")
        return super().reduces_at(block, depth) and self.merges(block) > 0

    def merges(self, block: int) -> int:
        return self.r if isinstance(self.r, int) else self.r[block]

    def reduced_length(self, length: int, block: int) -> int:
        return length - min(self.merges(block), length // 2)

    def forward(self, x: Tensor, attention: BlockAttention, groups: TokenGroups, block: int):
        patches = x[:, 1:]
        length = patches.shape[1]
        r = min(self.merges(block), length // 2)
        if r == 0:
            return x, groups
        metric = F.normalize(attention.keys.float(), dim=-1)
        similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, A, B'): set A even, set B odd
        best, match = similarity.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        # A tokens that merge into their match, and the rest (kept in sequence order, as ToMe does with a CLS token)
        merged, unmerged = order[:, :r], order[:, r:].sort(dim=-1).values
        target = match.gather(1, merged)
        n_unmerged, n_b = unmerged.shape[1], length // 2
        # sums of size-weighted tokens and of sizes, then one division: the size-weighted average
        sizes = groups.sizes.to(x.dtype)
        weighted = patches * sizes.unsqueeze(-1)
        a, b = weighted[:, ::2], weighted[:, 1::2]
        b = b.scatter_add(1, target.unsqueeze(-1).expand(-1, -1, x.shape[-1]), gather_tokens(a, merged))
        b_sizes = sizes[:, 1::2].scatter_add(1, target, sizes[:, ::2].gather(1, merged))
        new_sizes = torch.cat([sizes[:, ::2].gather(1, unmerged), b_sizes], dim=1)
        new_patches = torch.cat([gather_tokens(a, unmerged), b], dim=1) / new_sizes.unsqueeze(-1)
        # where each current token goes: kept A tokens first, then the B set (merged A tokens join their match)
        position = torch.empty(x.shape[0], length, dtype=torch.long, device=x.device)
        a_position = _positions(unmerged, length - n_b, fill=0).scatter(1, merged, n_unmerged + target)
        position[:, ::2] = a_position
        position[:, 1::2] = n_unmerged + torch.arange(n_b, device=x.device)
        regrouped = groups.regroup(position, n_unmerged + n_b)
        return torch.cat([x[:, :1], new_patches], dim=1), regrouped
