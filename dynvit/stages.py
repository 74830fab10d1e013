"""Stage contracts: what each pluggable stage takes and returns.

Shapes use B = batch, C = classes, D = embedding width, N1 / N2 = patch
tokens of the stage-1 (low-resolution) and stage-2 (full-resolution) grids,
M = full-resolution tokens computed afresh in stage 2, R = stage-1 tokens
reused in stage 2. M and R are fixed by a recipe, so stage 2 has static
shapes whatever the image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Grid = tuple[int, int]


@dataclass
class BackboneOutput:
    """What one pass of the backbone over a token sequence yields."""

    logits: Tensor  # (B, C)
    tokens: Tensor  # (B, 1 + L, D) after the final norm; index 0 is CLS
    class_attention: dict[int, Tensor]  # block -> (B, L): CLS query over the L patch tokens, head-mean


@dataclass
class Stage1Output(BackboneOutput):
    """Stage-1 pass plus what later stages reuse from it."""

    embeddings: Tensor  # (B, N1, D) stage-1 input embeddings (patch embedding + position)
    grid: Grid  # stage-1 patch grid (rows, cols)

    def take(self, index: Tensor, with_attention: bool = True) -> Stage1Output:
        """The same outputs for a sub-batch (``index`` into the batch)."""
        return Stage1Output(
            logits=self.logits[index],
            tokens=self.tokens[index],
            class_attention={k: v[index] for k, v in self.class_attention.items()} if with_attention else {},
            embeddings=self.embeddings[index],
            grid=self.grid,
        )


@dataclass
class Selection:
    """Which tokens stage 2 computes at full resolution and which it reuses.

    ``full_index``: (B, M) indices into the flattened full-resolution grid.
    ``reuse_index``: (B, R) indices into the flattened stage-1 grid.
    ``region``: (B, 4) the chosen window on the stage-1 grid as
    (row, col, height, width), for pictures and tests.
    ``kept``: (B, K) stage-1 indices whose full-resolution children are in
    ``full_index``; the parent of every ``full_index`` cell is among them.
    """

    full_index: Tensor
    reuse_index: Tensor
    region: Tensor
    kept: Tensor

    def take(self, index: Tensor) -> Selection:
        """The selection of a sub-batch (``index`` into the batch)."""
        return Selection(self.full_index[index], self.reuse_index[index], self.region[index], self.kept[index])

    @classmethod
    def whole_image(cls, batch: int, grid1: Grid, grid2: Grid, device: torch.device | None = None) -> Selection:
        """Every full-resolution token, nothing reused: stage 2 sees the whole image."""
        n1, n2 = grid1[0] * grid1[1], grid2[0] * grid2[1]
        full = torch.arange(n2, device=device).expand(batch, n2)
        kept = torch.arange(n1, device=device).expand(batch, n1)
        region = torch.tensor([0, 0, grid1[0], grid1[1]], device=device).expand(batch, 4)
        return cls(full, full.new_zeros(batch, 0), region, kept)


class Downsampler(nn.Module, ABC):
    """Makes the stage-1 input: (B, 3, H, W) -> (B, 3, h, w)."""

    @abstractmethod
    def output_size(self, size: int) -> int:
        """Side length of the output for an input of side ``size``."""

    @abstractmethod
    def forward(self, images: Tensor) -> Tensor: ...


class Backbone(nn.Module, ABC):
    """A ViT whose blocks, final norm and head serve every stage.

    The pipeline builds the token sequence (patch embeddings plus this
    stage's position table, possibly fused, gathered or reused) and hands
    it to :meth:`encode`, which prepends CLS and runs the shared layers.
    """

    embed_dim: int
    num_classes: int
    depth: int
    patch_size: int
    in_chans: int = 3  # image channels the patch embedding reads

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype, which inputs are cast to."""
        return next(self.parameters()).dtype

    @abstractmethod
    def grid_size(self, image_size: int | Sequence[int]) -> Grid:
        """Patch grid of an image of this side (or (H, W))."""

    @abstractmethod
    def embed_patches(self, images: Tensor, index: Tensor | None = None) -> Tensor:
        """Patch embeddings without position: (B, N, D), or (B, M, D) for ``index`` (B, M)."""

    @abstractmethod
    def position_embedding(self, grid: Grid) -> Tensor:
        """Position table of one stage's grid: (1, 1 + N, D); row 0 is CLS."""

    @abstractmethod
    def encode(self, tokens: Tensor, cls_position: Tensor, attention_blocks: Sequence[int] = ()) -> BackboneOutput:
        """Run (B, L, D) patch tokens, position already added, through the shared layers.

        ``attention_blocks`` names the blocks whose CLS attention row is
        returned in ``class_attention``.
        """


class ExitPolicy(nn.Module, ABC):
    """Decides which samples stop after stage 1 (inference only).

    A policy scores each sample; it exits when its score is >= the
    threshold. Exposing the score lets evaluation sweep every threshold in
    one broadcast instead of re-running the policy.
    """

    threshold: float

    @abstractmethod
    def score(self, logits: Tensor) -> Tensor:
        """(B, C) stage-1 logits -> (B,) float score; higher means more certain."""

    def forward(self, logits: Tensor, threshold: float | None = None) -> Tensor:
        """(B, C) stage-1 logits -> (B,) bool, True where the sample exits."""
        return self.score(logits) >= (self.threshold if threshold is None else threshold)


class RegionSelector(nn.Module, ABC):
    """Chooses the stage-2 tokens from what stage 1 saw."""

    def attention_blocks(self, depth: int) -> list[int]:
        """Blocks whose CLS attention stage 1 must return (none by default)."""
        return []

    def num_tokens(self, grid1: Grid, grid2: Grid, depth: int) -> tuple[int, int]:
        """(M, R): full-resolution tokens computed and stage-1 tokens reused per image.

        The default runs the selector once on a dummy stage-1 output;
        selectors that know their counts say so without running.
        """
        n1 = grid1[0] * grid1[1]
        device = next((t.device for t in self.buffers()), None)
        probe = Stage1Output(
            logits=torch.zeros(1, 1, device=device),
            tokens=torch.zeros(1, 1 + n1, 1, device=device),
            class_attention={b: torch.rand(1, n1, device=device) for b in self.attention_blocks(depth)},
            embeddings=torch.zeros(1, n1, 1, device=device),
            grid=grid1,
        )
        selection = self(probe, grid2)
        return selection.full_index.shape[1], selection.reuse_index.shape[1]

    @abstractmethod
    def forward(self, stage1: Stage1Output, grid2: Grid) -> Selection: ...


class Fuser(nn.Module, ABC):
    """Enriches the full-resolution patch embeddings with stage-1 features."""

    @abstractmethod
    def forward(self, patches: Tensor, stage1_tokens: Tensor, parent: Tensor) -> Tensor:
        """(B, M, D) patches, (B, K, D) final stage-1 tokens of the kept cells, (B, M)
        index of each patch's parent among those K -> (B, M, D)."""


class TokenReuser(nn.Module, ABC):
    """Supplies stage-1 tokens that stand in for the full-resolution ones not computed."""

    @abstractmethod
    def forward(self, stage1: Stage1Output, reuse_index: Tensor) -> Tensor:
        """(B, R) stage-1 indices -> (B, R', D) tokens appended to stage 2 (R' may be 0)."""


class Loss(nn.Module, ABC):
    """Training objective over every stage's logits."""

    @abstractmethod
    def forward(self, logits: Sequence[Tensor], target: Tensor) -> Tensor:
        """Stage logits (each (B, C)) and targets ((B,) labels or (B, C) soft) -> scalar."""
