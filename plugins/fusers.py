"""Fusers: stage-1 features added to the full-resolution patch embeddings."""

from __future__ import annotations

from timm.layers import Mlp
from torch import Tensor, nn

from dynvit.registry import register
from dynvit.stages import Fuser, gather_tokens


@register("fuser", "mlp_upsample")
class MLPUpsampleFuser(Fuser):
    """LF-ViT's fusion: LN + MLP(D, 4D, D) on the final stage-1 tokens, nearest-upsampled, added.

    Upsampling is a gather by parent index, so only the patches stage 2
    computes are touched. ``block`` matches the authors' ``reuse_block``.
    """

    def __init__(self, embed_dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.LayerNorm(embed_dim, eps=1e-6),
            Mlp(embed_dim, int(embed_dim * mlp_ratio), act_layer=nn.GELU),
        )

    def forward(self, patches: Tensor, stage1_tokens: Tensor, parent: Tensor) -> Tensor:
        return patches + gather_tokens(self.block(stage1_tokens), parent).to(patches.dtype)


@register("fuser", "none")
class NoFuser(Fuser):
    """Stage 2 sees the plain full-resolution patch embeddings."""

    is_noop = True

    def forward(self, patches: Tensor, stage1_tokens: Tensor, parent: Tensor) -> Tensor:
        return patches
