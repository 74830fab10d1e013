"""Stage contracts: what each pluggable stage takes and returns.

A pipeline is a list of stages. Each runs a backbone over a token
sequence: the whole (possibly downsampled) image, or the tokens a region
selector picks at the stage's own resolution from what the previous stage
saw. Shapes use B = batch, C = classes, D = embedding width, N = patch
tokens of a stage's grid, M = tokens of this stage's grid computed afresh,
R = previous-stage tokens reused. M and R are fixed by a recipe, so every
stage has static shapes whatever the image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

Grid = tuple[int, int]


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """(B or 1, N, D) tokens at (B, M) indices -> (B, M, D)."""
    index = index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.gather(tokens.expand(index.shape[0], -1, -1), 1, index)


@dataclass
class BackboneOutput:
    """What one pass of the backbone over a token sequence yields.

    ``attention_logits`` and ``block_tokens`` are recorded only when a
    later stage's plugin asks for them (see :class:`StageContext`).
    """

    logits: Tensor  # (B, C)
    tokens: Tensor  # (B, 1 + L, D) after the final norm; index 0 is CLS
    class_attention: dict[int, Tensor]  # block -> (B, L): CLS query over the L patch tokens, head-mean
    attention_logits: list[Tensor] | None = None  # per block (B, H, 1 + L, 1 + L), scaled, before softmax
    block_tokens: list[Tensor] | None = None  # per block (B, 1 + L, D), the block's output
    aux: dict[str, Tensor] = field(default_factory=dict)  # what hooks leave for losses or later stages


@dataclass
class StageOutput(BackboneOutput):
    """One stage's pass plus what later stages reuse from it."""

    embeddings: Tensor | None = None  # (B, N, D) input embeddings (patch + position) of a whole-image stage
    grid: Grid = (0, 0)  # this stage's patch grid (rows, cols)
    selection: Selection | None = None  # the tokens a refining stage computed

    def take(self, index: Tensor, with_attention: bool = True) -> StageOutput:
        """The same outputs for a sub-batch (``index`` into the batch)."""

        def pick(values: list[Tensor] | None) -> list[Tensor] | None:
            return None if values is None else [v[index] for v in values]

        return StageOutput(
            logits=self.logits[index],
            tokens=self.tokens[index],
            class_attention={k: v[index] for k, v in self.class_attention.items()} if with_attention else {},
            attention_logits=pick(self.attention_logits),
            block_tokens=pick(self.block_tokens),
            aux={k: v[index] for k, v in self.aux.items()},
            embeddings=None if self.embeddings is None else self.embeddings[index],
            grid=self.grid,
            selection=None if self.selection is None else self.selection.take(index),
        )


Stage1Output = StageOutput  # the name of the two-stage era


@dataclass
class Selection:
    """Which tokens a refining stage computes at its resolution and which it reuses.

    ``full_index``: (B, M) indices into this stage's flattened grid.
    ``reuse_index``: (B, R) indices into the previous stage's flattened grid.
    ``region``: (B, 4) the chosen window on the previous stage's grid as
    (row, col, height, width), for pictures and tests.
    ``kept``: (B, K) previous-stage indices whose children are in
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
        """Every token of the finer grid, nothing reused: the stage sees the whole image."""
        n1, n2 = grid1[0] * grid1[1], grid2[0] * grid2[1]
        full = torch.arange(n2, device=device).expand(batch, n2)
        kept = torch.arange(n1, device=device).expand(batch, n1)
        region = torch.tensor([0, 0, grid1[0], grid1[1]], device=device).expand(batch, 4)
        return cls(full, full.new_zeros(batch, 0), region, kept)


@dataclass
class PipelineOutput:
    """Training-mode result: every stage on every sample. This is what a :class:`Loss` receives."""

    stages: tuple[StageOutput, ...]

    @property
    def logits(self) -> tuple[Tensor, ...]:
        """One (B, C) tensor per stage."""
        return tuple(stage.logits for stage in self.stages)

    @property
    def selection(self) -> Selection | None:
        """What the last refining stage looked at (None if no stage refines)."""
        return next((s.selection for s in reversed(self.stages) if s.selection is not None), None)


@dataclass
class BlockEdits:
    """How a hook changes the blocks of one stage's pass; each callable takes the block index.

    ``attention_bias(block)``: None or a float tensor broadcastable to
    (B, H, L, L), added to the scaled attention logits before the softmax
    (the fused attention kernel takes it as its additive mask).
    ``mlp_input(block)``: None or (B, L, E) extra channels concatenated to
    the input of the block's MLP branch (its second norm), for a backbone
    built with ``mlp_extra_channels=E``.
    """

    attention_bias: Callable[[int], Tensor | None] | None = None
    mlp_input: Callable[[int], Tensor | None] | None = None


class EncoderHook(nn.Module, ABC):
    """Takes part in one stage's pass through its backbone's blocks, from what the previous stage left.

    Declares what it needs the previous stage to record; the pipeline asks
    that stage for it, and nothing is recorded when no hook asks.
    """

    needs_attention_logits: bool = False
    needs_block_tokens: bool = False

    @abstractmethod
    def prepare(self, context: StageContext, backbone: Backbone) -> BlockEdits:
        """Compute, once per pass, the block edits of this stage from ``context.previous``."""


@dataclass
class TokenGroups:
    """Where a pass's original patch tokens went once a :class:`TokenReducer` shrank the sequence.

    ``owner`` (B, L0): for each original patch token, the current patch token
    that holds it (an index among the L current patch tokens; L itself means
    the token was dropped). ``sizes`` (B, L): how many original tokens each
    current patch token holds (ToMe's token size).
    """

    owner: Tensor
    sizes: Tensor

    @classmethod
    def identity(cls, batch: int, length: int, device: torch.device | None = None) -> TokenGroups:
        """Before any reduction: every token holds itself."""
        owner = torch.arange(length, device=device).expand(batch, length)
        return cls(owner, torch.ones(batch, length, device=device))

    def regroup(self, new_position: Tensor, length: int) -> TokenGroups:
        """The groups after a reduction that moved current token ``j`` to ``new_position[:, j]`` (``length``:
        dropped) of ``length`` new tokens; sizes of tokens that land together add up."""
        dropped = new_position.new_full((new_position.shape[0], 1), length)
        owner = torch.cat([new_position, dropped], dim=1).gather(1, self.owner)
        sizes = self.sizes.new_zeros(new_position.shape[0], length + 1).scatter_add_(1, new_position, self.sizes)
        return TokenGroups(owner, sizes[:, :length])

    def spread_attention(self, attention: Tensor) -> Tensor:
        """(B, L) attention over the current patch tokens -> (B, L0) over the original ones.

        A token holding s originals passes each of them 1/s of its share: with
        proportional attention and equal keys, exactly what each would get
        unmerged. Dropped tokens get 0. The result sums to what ``attention`` does.
        """
        padded = torch.cat([attention, attention.new_zeros(attention.shape[0], 1)], dim=1)
        sizes = torch.cat([self.sizes, self.sizes.new_ones(self.sizes.shape[0], 1)], dim=1).to(attention.dtype)
        return padded.gather(1, self.owner) / sizes.gather(1, self.owner)

    def spread_tokens(self, tokens: Tensor) -> Tensor:
        """(B, L, D) current patch tokens -> (B, L0, D): each original position reads the token holding it
        (zeros where it was dropped), so later stages index the grid as if nothing had been reduced."""
        padded = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])], dim=1)
        return gather_tokens(padded, self.owner)


@dataclass
class BlockAttention:
    """What a :class:`TokenReducer` reads from the attention of the block it reduces after.

    ``class_attention`` (B, L): the CLS query's attention over the patch
    tokens, head-mean, as the softmax saw it (size bias included).
    ``keys`` (B, L, d): the patch tokens' keys, head-mean (ToMe's metric).
    Each is None unless the reducer declares it reads it.
    """

    class_attention: Tensor | None = None
    keys: Tensor | None = None


class TokenReducer(nn.Module, ABC):
    """Shrinks a stage's token sequence inside chosen blocks, between attention and MLP (EViT, ToMe).

    ``stage`` says which stages of the pipeline it runs in (an index or a
    list, negative from the end; -1 is the last stage). The CLS token
    (index 0) is never reduced. Reducers keep shapes static: how many
    tokens survive a block depends only on how many entered it.
    """

    is_noop: bool = False  # True: the pipeline leaves it out
    reads_class_attention: bool = False
    reads_keys: bool = False
    proportional_attention: bool = False  # add log(token size) to every attention logit once tokens merged

    def __init__(self, stage: int | Sequence[int] = -1) -> None:
        super().__init__()
        self.stage = [stage] if isinstance(stage, int) else [int(s) for s in stage]

    def check(self, depth: int) -> None:
        """Raise ValueError naming the setting if this reducer cannot act in a ``depth``-block backbone."""
        for block in range(depth):
            self.reduces_at(block, depth)

    @abstractmethod
    def reduces_at(self, block: int, depth: int) -> bool:
        """Whether the sequence shrinks inside ``block`` of a ``depth``-block backbone."""

    @abstractmethod
    def reduced_length(self, length: int, block: int) -> int:
        """Patch tokens leaving ``block`` when ``length`` entered it (CLS not counted)."""

    @abstractmethod
    def forward(
        self, x: Tensor, attention: BlockAttention, groups: TokenGroups, block: int
    ) -> tuple[Tensor, TokenGroups]:
        """(B, 1 + L, D) tokens after the block's attention -> (B, 1 + L', D) and the regrouped originals."""


@dataclass
class StageContext:
    """What ``encode`` is told about the stage it runs."""

    index: int  # 0-based stage
    grid: Grid  # this stage's patch grid
    previous: StageOutput | None = None  # what the previous stage left, sub-batched like the tokens
    attention_blocks: Sequence[int] = ()  # blocks whose CLS attention row to record
    record_attention_logits: bool = False  # every block's attention logits (a later hook asks)
    record_block_tokens: bool = False  # every block's output tokens (a later hook asks)
    hooks: Sequence[EncoderHook] = ()
    reducer: TokenReducer | None = None  # shrinks the sequence inside some blocks


class Downsampler(nn.Module, ABC):
    """Makes the stage-1 input: (B, 3, H, W) -> (B, 3, h, w)."""

    @abstractmethod
    def output_size(self, size: int) -> int:
        """Side length of the output for an input of side ``size``."""

    @abstractmethod
    def forward(self, images: Tensor) -> Tensor: ...


class Backbone(nn.Module, ABC):
    """A ViT whose blocks, final norm and head serve one or more stages.

    The pipeline builds the token sequence (patch embeddings plus the
    stage's position table, possibly fused, gathered or reused) and hands
    it to :meth:`encode`, which prepends CLS and runs the blocks.
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
    def encode(self, tokens: Tensor, cls_position: Tensor, context: StageContext | None = None) -> BackboneOutput:
        """Run (B, L, D) patch tokens, position already added, through the blocks, final norm and head.

        ``context`` says which stage this is, which CLS attention rows and
        per-block records to return, and which hooks edit the blocks; None
        is a plain pass.
        """


class ExitPolicy(nn.Module, ABC):
    """Decides which samples stop after a stage (inference only).

    A policy scores each sample; it exits when its score is >= the
    threshold. Exposing the score lets evaluation sweep every threshold in
    one broadcast instead of re-running the policy.
    """

    threshold: float

    @abstractmethod
    def score(self, logits: Tensor) -> Tensor:
        """(B, C) stage logits -> (B,) float score; higher means more certain."""

    def forward(self, logits: Tensor, threshold: float | None = None) -> Tensor:
        """(B, C) stage logits -> (B,) bool, True where the sample exits."""
        return self.score(logits) >= (self.threshold if threshold is None else threshold)


class RegionSelector(nn.Module, ABC):
    """Chooses a refining stage's tokens from what the previous stage saw."""

    def attention_blocks(self, depth: int) -> list[int]:
        """Blocks whose CLS attention the previous stage must return (none by default)."""
        return []

    def num_tokens(self, grid1: Grid, grid2: Grid, depth: int) -> tuple[int, int]:
        """(M, R): tokens of the finer grid computed and previous-stage tokens reused per image.

        The default runs the selector once on a dummy previous-stage output;
        selectors that know their counts say so without running.
        """
        n1 = grid1[0] * grid1[1]
        device = next((t.device for t in self.buffers()), None)
        probe = StageOutput(
            logits=torch.zeros(1, 1, device=device),
            tokens=torch.zeros(1, 1 + n1, 1, device=device),
            class_attention={b: torch.rand(1, n1, device=device) for b in self.attention_blocks(depth)},
            embeddings=torch.zeros(1, n1, 1, device=device),
            grid=grid1,
        )
        selection = self(probe, grid2)
        return selection.full_index.shape[1], selection.reuse_index.shape[1]

    @abstractmethod
    def forward(self, stage1: StageOutput, grid2: Grid) -> Selection:
        """The previous stage's output and this stage's grid -> which tokens to compute and reuse."""


class Fuser(nn.Module, ABC):
    """Enriches a refining stage's patch embeddings with the previous stage's features."""

    is_noop: bool = False  # True: the pipeline leaves the fuser out and skips its gathers

    @abstractmethod
    def forward(self, patches: Tensor, stage1_tokens: Tensor, parent: Tensor) -> Tensor:
        """(B, M, D) patches, (B, K, D) final stage-1 tokens of the kept cells, (B, M)
        index of each patch's parent among those K -> (B, M, D)."""


class TokenReuser(nn.Module, ABC):
    """Supplies previous-stage tokens that stand in for the finer ones not computed."""

    is_noop: bool = False  # True: the pipeline leaves the reuser out and skips its gathers

    @abstractmethod
    def forward(self, stage1: StageOutput, reuse_index: Tensor) -> Tensor:
        """(B, R) stage-1 indices -> (B, R', D) tokens appended to stage 2 (R' may be 0)."""


class Loss(nn.Module, ABC):
    """Training objective over the whole pipeline output: every stage's logits and aux outputs."""

    @abstractmethod
    def forward(self, output: PipelineOutput, target: Tensor) -> Tensor:
        """The pipeline's output (``output.logits``: one (B, C) per stage; ``output.stages[i].aux``) and
        targets ((B,) labels or (B, C) soft) -> scalar."""
