"""Token reusers: stage-1 tokens that stand in for the full-resolution tokens not computed."""

from __future__ import annotations

from torch import Tensor

from dynvit.registry import register
from dynvit.stages import StageOutput, TokenReuser, gather_tokens


@register("token_reuser", "stage1_embeddings")
class Stage1EmbeddingReuser(TokenReuser):
    """LF-ViT's reuse: the stage-1 input embeddings (patch embedding + stage-1 position)."""

    def forward(self, stage1: StageOutput, reuse_index: Tensor) -> Tensor:
        return gather_tokens(stage1.embeddings, reuse_index)


@register("token_reuser", "none")
class NoReuser(TokenReuser):
    """Tokens not selected are dropped: stage 2 sees only the selected region."""

    is_noop = True

    def forward(self, stage1: StageOutput, reuse_index: Tensor) -> Tensor:
        return stage1.embeddings[:, :0]
