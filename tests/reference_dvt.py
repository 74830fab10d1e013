"""Independent plain-torch reference for DVT (Dynamic Vision Transformer, NeurIPS 2021).

Written from a behavioural spec (see notes/dvt_facts.md), not from the authors' code. It evaluates the three
cascaded transformers straight from a state dict laid out like the authors' released ``model_state_dict``
(prefixes ``less_less_token.`` / ``less_token.`` / ``normal_token.``) so that dynvit's DVT can be checked
against it. Only torch is used: no timm, no dynvit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PREFIXES = ("less_less_token", "less_token", "normal_token")
PATCHES = (32, 23, 16)  # conv kernel (= stride) of each transformer's patch embedding
GRIDS = (7, 10, 14)  # token grid of each transformer at 224 px
REUSE_DIM, REUSE_HIDDEN, LN_EPS = 48, 128, 1e-6


def dvt_authors_state_dict(
    embed_dim: int = 32,
    depth: int = 2,
    num_heads: int = 2,
    num_classes: int = 7,
    seed: int = 0,
    feature_reuse: bool = True,
    relation_reuse: bool = True,
) -> dict[str, Tensor]:
    """Random tensors with the authors' checkpoint keys and shapes (224 px input, grids 7/10/14).

    Weights are drawn with std ``fan_in ** -0.5`` so activations stay O(1); LayerNorm weights are near 1.
    ``feature_reuse`` / ``relation_reuse`` select the layout of the authors' ablation models (both on = DVT).
    """
    gen = torch.Generator().manual_seed(seed)
    d, hidden, heads_total = embed_dim, 4 * embed_dim, depth * num_heads
    state: dict[str, Tensor] = {}

    def rand(*shape: int, std: float) -> Tensor:
        return torch.randn(*shape, generator=gen) * std

    def linear(name: str, out_f: int, in_f: int) -> None:
        state[f"{name}.weight"] = rand(out_f, in_f, std=in_f**-0.5)
        state[f"{name}.bias"] = rand(out_f, std=0.02)

    def norm(name: str, width: int) -> None:
        state[f"{name}.weight"] = 1.0 + rand(width, std=0.1)
        state[f"{name}.bias"] = rand(width, std=0.02)

    for index, (prefix, patch, grid) in enumerate(zip(PREFIXES, PATCHES, GRIDS)):
        reuse_f, reuse_r = index > 0 and feature_reuse, index > 0 and relation_reuse
        state[f"{prefix}.cls_token"] = rand(1, 1, d, std=0.2)
        state[f"{prefix}.pos_embed"] = rand(1, grid * grid + 1, d, std=0.2)
        state[f"{prefix}.patch_embed.proj.weight"] = rand(d, 3, patch, patch, std=(3 * patch * patch) ** -0.5)
        state[f"{prefix}.patch_embed.proj.bias"] = rand(d, std=0.02)
        mlp_in = d + REUSE_DIM if reuse_f else d
        for i in range(depth):
            blk = f"{prefix}.blocks.{i}"
            norm(f"{blk}.norm1", d)
            linear(f"{blk}.attn.qkv", 3 * d, d)
            linear(f"{blk}.attn.proj", d, d)
            norm(f"{blk}.norm2", mlp_in)
            linear(f"{blk}.mlp.fc1", hidden, mlp_in)
            linear(f"{blk}.mlp.fc2", d, hidden)
            if reuse_f:
                norm(f"{blk}.feature_resuse_mlp.0", d)
                linear(f"{blk}.feature_resuse_mlp.1.fc1", REUSE_HIDDEN, d)
                linear(f"{blk}.feature_resuse_mlp.1.fc2", REUSE_DIM, REUSE_HIDDEN)
        norm(f"{prefix}.norm", d)
        if reuse_r:
            linear(f"{prefix}.relation_reuse_conv.0", 3 * heads_total, heads_total)
            linear(f"{prefix}.relation_reuse_conv.2", heads_total, 3 * heads_total)
            for j in (0, 2):
                key = f"{prefix}.relation_reuse_conv.{j}.weight"
                state[key] = state[key][:, :, None, None]  # 1x1 conv kernels
        linear(f"{prefix}.head", num_classes, d)
    return state


def _layer_norm(x: Tensor, state: dict[str, Tensor], name: str) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), state[f"{name}.weight"], state[f"{name}.bias"], LN_EPS)


def _linear(x: Tensor, state: dict[str, Tensor], name: str) -> Tensor:
    return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])


def _two_layer_mlp(x: Tensor, state: dict[str, Tensor], name: str) -> Tensor:
    """fc1 -> exact (erf) GELU -> fc2, both with bias."""
    return _linear(F.gelu(_linear(x, state, f"{name}.fc1")), state, f"{name}.fc2")


def _resize_grid(maps: Tensor, size: int) -> Tensor:
    """Resize (M, C, g, g) square maps to (M, C, size, size): nearest upsample to 2g, then adaptive average pool."""
    grid = maps.shape[-1]
    maps = F.interpolate(maps, size=(2 * grid, 2 * grid), mode="nearest")
    return F.adaptive_avg_pool2d(maps, (size, size))


def _resize_relations(rel: Tensor, grid: int) -> Tensor:
    """Map (B, C, n+1, n+1) attention maps onto (B, C, grid**2+1, grid**2+1); index 0 is the CLS token.

    Patch key columns are resized over the old key grid (per query row, CLS column kept), then patch query rows
    over the old query grid (per key column, CLS row kept). The CLS-CLS entry is copied unchanged.
    """
    b, c, t, _ = rel.shape
    old, new = math.isqrt(t - 1), grid * grid
    cols = _resize_grid(rel[..., 1:].reshape(b * c * t, 1, old, old), grid).reshape(b, c, t, new)
    rel = torch.cat((rel[..., :1], cols), dim=-1).transpose(-1, -2)  # (B, C, key, query)
    rows = _resize_grid(rel[..., 1:].reshape(b * c * (new + 1), 1, old, old), grid).reshape(b, c, new + 1, new)
    return torch.cat((rel[..., :1], rows), dim=-1).transpose(-1, -2)  # (B, C, query, key)


def _reused_features(feats: Tensor, state: dict[str, Tensor], name: str, grid: int) -> Tensor:
    """(B, n+1, D) previous final-block tokens -> (B, grid**2+1, 48); the CLS slot is zeros."""
    emb = _two_layer_mlp(_layer_norm(feats, state, f"{name}.0"), state, f"{name}.1")[:, 1:]
    b, n, c = emb.shape
    old = math.isqrt(n)
    emb = _resize_grid(emb.transpose(1, 2).reshape(b, c, old, old), grid).flatten(2).transpose(1, 2)
    return torch.cat((emb.new_zeros(b, 1, c), emb), dim=1)


def _transformer(
    state: dict[str, Tensor], prefix: str, images: Tensor, heads: int, feats: Tensor | None, rels: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """One DeiT-style transformer. Returns (logits, final-block tokens before the final norm, stacked logits maps).

    ``feats``: previous transformer's (B, n+1, D) tokens or None; ``rels``: its (B, depth*heads, n+1, n+1) maps.
    """
    weight = state[f"{prefix}.patch_embed.proj.weight"]
    kernel, grid = weight.shape[-1], math.isqrt(state[f"{prefix}.pos_embed"].shape[1] - 1)
    pad = max(0, (grid * kernel - images.shape[-1] + 1) // 2)  # 0 for kernels 32 and 16, 3 for kernel 23
    x = F.conv2d(images, weight, state[f"{prefix}.patch_embed.proj.bias"], stride=kernel, padding=pad)
    assert x.shape[-2:] == (grid, grid), f"{prefix}: patch grid {tuple(x.shape[-2:])} != {grid}x{grid}"
    b, d = x.shape[0], x.shape[1]
    x = torch.cat((state[f"{prefix}.cls_token"].expand(b, -1, -1), x.flatten(2).transpose(1, 2)), dim=1)
    x = x + state[f"{prefix}.pos_embed"]
    tokens = x.shape[1]
    depth = len({k.split(".")[2] for k in state if k.startswith(f"{prefix}.blocks.")})
    if rels is not None:
        conv = f"{prefix}.relation_reuse_conv"
        rels = F.conv2d(rels, state[f"{conv}.0.weight"], state[f"{conv}.0.bias"])
        rels = F.conv2d(F.gelu(rels), state[f"{conv}.2.weight"], state[f"{conv}.2.bias"])
        rels = _resize_relations(rels, grid).chunk(depth, dim=1)  # block i gets channels [i*heads, (i+1)*heads)
    maps = []
    for i in range(depth):
        blk = f"{prefix}.blocks.{i}"
        q, k, v = (
            _linear(_layer_norm(x, state, f"{blk}.norm1"), state, f"{blk}.attn.qkv")
            .reshape(b, tokens, 3, heads, d // heads)
            .permute(2, 0, 3, 1, 4)
        )
        logits = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5
        if rels is not None:
            logits = logits + rels[i]
        maps.append(logits)  # pre-softmax, scaled, including what was added from upstream
        attn = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, tokens, d)
        x = x + _linear(attn, state, f"{blk}.attn.proj")
        mlp_in = x
        if state[f"{blk}.norm2.weight"].shape[0] == d + REUSE_DIM:
            extra = (
                _reused_features(feats, state, f"{blk}.feature_resuse_mlp", grid)
                if feats is not None
                else x.new_zeros(b, tokens, REUSE_DIM)  # reuse switched off on a reuse-trained checkpoint
            )
            mlp_in = torch.cat((x, extra), dim=-1)
        x = x + _two_layer_mlp(_layer_norm(mlp_in, state, f"{blk}.norm2"), state, f"{blk}.mlp")
    logits_out = _linear(_layer_norm(x, state, f"{prefix}.norm")[:, 0], state, f"{prefix}.head")
    return logits_out, x, torch.cat(maps, dim=1)


def reference_dvt(
    state: dict[str, Tensor],
    images: Tensor,
    feature_reuse: bool = True,
    relation_reuse: bool = True,
    num_heads: int | None = None,
) -> list[Tensor]:
    """Logits (B, num_classes) of the three DVT transformers, coarsest first, all evaluated (no early exit).

    Heads are inferred from ``relation_reuse_conv`` (channels = depth * heads); pass ``num_heads`` when the state
    has no relation-reuse weights. With ``feature_reuse=False`` on a state whose MLP input is D+48 wide, the 48
    reuse channels are zeros; with ``relation_reuse=False`` nothing is added to the attention logits.
    """
    if num_heads is None:
        conv_keys = [k for k in state if k.endswith("relation_reuse_conv.0.weight")]
        if not conv_keys:
            raise ValueError("state has no relation_reuse_conv weights: pass num_heads")
        depth = len({k.split(".")[2] for k in state if k.startswith(f"{PREFIXES[-1]}.blocks.")})
        num_heads = state[conv_keys[0]].shape[1] // depth
    outputs: list[Tensor] = []
    feats: Tensor | None = None
    rels: Tensor | None = None
    for prefix in PREFIXES:
        logits, last_tokens, maps = _transformer(
            state, prefix, images, num_heads, feats if feature_reuse else None, rels if relation_reuse else None
        )
        outputs.append(logits)
        feats, rels = last_tokens, maps  # each transformer reuses only its immediate predecessor
    return outputs
