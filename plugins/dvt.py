"""DVT's reuse (Wang et al., "Not All Images are Worth 16x16 Words", NeurIPS 2021) as encoder hooks.

DVT cascades whole-image transformers of growing token grids (7x7, 10x10,
14x14 at 224 px), each with its own weights. A later transformer reuses
what its immediate predecessor computed, in two independent ways; each is
one hook here, so a recipe switches them on and off separately:

* ``dvt_feature_reuse``: the predecessor's last-block tokens become 48
  extra input channels of every block's MLP branch (a backbone built with
  ``mlp_extra_channels: 48``).
* ``dvt_relation_reuse``: the predecessor's attention logits, transformed
  and resized, are added to every block's attention logits.

Both resize a map from the predecessor's grid to this stage's with
:func:`resize_grid` (nearest x2, then adaptive average pooling), the rule
the authors use for the 7 -> 10 and 10 -> 14 steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from dynvit.registry import register
from dynvit.stages import Backbone, BlockEdits, EncoderHook, Grid, StageContext

LN_EPS = 1e-6  # DeiT's LayerNorm epsilon, which the authors' reuse modules share


def resize_grid(maps: Tensor, grid: Grid) -> Tensor:
    """(..., h, w) maps -> (..., rows, cols): nearest upsampling to (2h, 2w), then adaptive average pooling.

    DVT's resize between grids that are not integer multiples of each
    other (7 -> 10, 10 -> 14). Pooling after the x2 upsampling averages
    overlapping, uneven windows (PyTorch's floor/ceil window rule), so it
    is not a bilinear interpolation; copying it exactly is what lets the
    authors' weights load. Leading dimensions are flattened into channels,
    so any number of maps is resized in one call.
    """
    *lead, h, w = maps.shape
    flat = maps.reshape(1, math.prod(lead), h, w)  # every map a channel: both ops treat channels alike
    flat = F.interpolate(flat, size=(2 * h, 2 * w), mode="nearest")
    flat = F.adaptive_avg_pool2d(flat, grid)
    return flat.reshape(*lead, *grid)


def resize_relations(maps: Tensor, old: Grid, new: Grid) -> Tensor:
    """(B, C, 1 + n, 1 + n) token-to-token maps (index 0 = CLS) -> (B, C, 1 + N, 1 + N).

    Separable, with CLS kept out of the spatial resize: first every query
    row's patch keys are resized over the old key grid (the CLS key column
    is kept as it is), then every key column's patch queries over the old
    query grid (the CLS query row, already resized over keys, is kept). So
    the CLS-CLS entry is copied, the CLS row is resized over keys only, the
    CLS column over queries only, and patch-patch entries over both.
    """
    b, c, t, _ = maps.shape
    n = new[0] * new[1]
    keys = resize_grid(maps[..., 1:].reshape(b, c * t, *old), new).reshape(b, c, t, n)
    maps = torch.cat([maps[..., :1], keys], dim=-1)  # (B, C, 1 + n queries, 1 + N keys)
    queries = maps[:, :, 1:].transpose(-1, -2).reshape(b, c * (1 + n), *old)
    queries = resize_grid(queries, new).reshape(b, c, 1 + n, n).transpose(-1, -2)
    return torch.cat([maps[:, :, :1], queries], dim=2)


def _check_previous(hook: str, backbone: Backbone | None, previous_backbone: Backbone | None) -> None:
    if backbone is None or previous_backbone is None:
        raise ValueError(f"{hook} reads the previous stage; put it on the second stage or later")


@register("encoder_hook", "dvt_feature_reuse")
class DVTFeatureReuse(EncoderHook):
    """DVT's feature reuse: the previous stage's last-block tokens as extra MLP input channels of every block.

    The previous stage's tokens after its last block, before its final
    norm (the authors take them there: the final norm only feeds the head),
    go through one ``LayerNorm -> Linear(D, hidden) -> GELU -> Linear(hidden,
    channels)`` per block of this stage (block ``i`` owns ``mlps[i]``, so
    each block gets its own 48 features from the same source). The patch
    outputs are resized to this stage's grid with :func:`resize_grid`; the
    CLS position gets zeros. The backbone concatenates them to each block's
    MLP input before its second norm (``mlp_extra_channels``), so norm2
    and fc1 are ``channels`` wider, as in the authors' checkpoints.
    """

    needs_block_tokens = True

    def __init__(
        self,
        hidden: int = 128,
        channels: int = 48,
        backbone: Backbone | None = None,
        previous_backbone: Backbone | None = None,
    ) -> None:
        super().__init__()
        _check_previous("dvt_feature_reuse", backbone, previous_backbone)
        extra = getattr(backbone, "mlp_extra_channels", 0)
        if extra != channels:
            raise ValueError(
                f"dvt_feature_reuse gives {channels} channels to each block's MLP; build this stage's backbone "
                f"with mlp_extra_channels: {channels} (it has {extra})"
            )
        width = previous_backbone.embed_dim
        self.channels = channels
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width, eps=LN_EPS), Mlp(width, hidden, channels)) for _ in range(backbone.depth)
        )

    def prepare(self, context: StageContext, backbone: Backbone) -> BlockEdits:
        previous = context.previous
        if previous is None or not previous.block_tokens:
            raise RuntimeError("dvt_feature_reuse: the previous stage recorded no block tokens")
        source = previous.block_tokens[-1]  # (B, 1 + n, D): last block, before the final norm
        old, new = previous.grid, context.grid

        def features(block: int) -> Tensor:
            patches = self.mlps[block](source)[:, 1:]  # (B, n, E): the CLS output is not reused
            b, _, e = patches.shape
            maps = resize_grid(patches.transpose(1, 2).reshape(b, e, *old), new)  # row-major like the patches
            return torch.cat([patches.new_zeros(b, 1, e), maps.flatten(2).transpose(1, 2)], dim=1)

        return BlockEdits(mlp_input=features)


@register("encoder_hook", "dvt_relation_reuse")
class DVTRelationReuse(EncoderHook):
    """DVT's relation reuse: the previous stage's attention logits, added to this stage's before the softmax.

    All of the previous stage's per-block maps (scaled, pre-softmax, with
    whatever it reused itself already added) are stacked as depth x heads
    channels, block-major, and transformed at the old resolution by a
    per-position MLP (1x1 convolutions, ``hidden_ratio`` times wider, GELU),
    mixing relations across blocks and heads. The result is resized to
    this stage's tokens with :func:`resize_relations` and split back into
    blocks: block ``i`` adds channels ``[i*H, (i+1)*H)`` to its logits.
    """

    needs_attention_logits = True

    def __init__(
        self, hidden_ratio: int = 3, backbone: Backbone | None = None, previous_backbone: Backbone | None = None
    ) -> None:
        super().__init__()
        _check_previous("dvt_relation_reuse", backbone, previous_backbone)
        shapes = [(b.depth, b.model.blocks[0].attn.num_heads) for b in (previous_backbone, backbone)]
        if shapes[0] != shapes[1]:
            raise ValueError(
                "dvt_relation_reuse maps every (block, head) of the previous stage to the same of this one; "
                f"the previous backbone has (depth, heads) {shapes[0]}, this one {shapes[1]}"
            )
        self.depth, self.heads = shapes[1]
        channels = self.depth * self.heads
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden_ratio * channels, 1),
            nn.GELU(),
            nn.Conv2d(hidden_ratio * channels, channels, 1),
        )

    def prepare(self, context: StageContext, backbone: Backbone) -> BlockEdits:
        previous = context.previous
        if previous is None or not previous.attention_logits:
            raise RuntimeError("dvt_relation_reuse: the previous stage recorded no attention logits")
        maps = self.conv(torch.cat(previous.attention_logits, dim=1))  # (B, depth*heads, 1 + n, 1 + n)
        maps = resize_relations(maps, previous.grid, context.grid)
        per_block = maps.split(self.heads, dim=1)
        return BlockEdits(attention_bias=lambda block: per_block[block])
