"""Backbone plugins: timm Vision Transformers, shared by every stage."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from dynvit.registry import register
from dynvit.stages import Backbone, BackboneOutput, BlockAttention, Grid, StageContext, TokenGroups, TokenReducer


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device and means CUDA
        return device_type == "cuda" and torch.is_autocast_enabled()


def _matmul_rounds_like_conv(images: Tensor) -> bool:
    """Whether a matrix product of patch pixels gives the patch convolution's result, and is worth taking.

    Only on CUDA, where the matrix product is the faster (H100, batch 1024, 88 patches each: 1.1 ms against
    3.4-4.2 ms for the convolution under bfloat16 autocast). There both agree when both compute in a 16-bit
    type (autocast, or a 16-bit model: the same rounded products, at most one unit of the output's last place
    apart) or both in IEEE float32 (TF32 off for both); with TF32 on for either, only the convolution rounds
    like the convolution. On the CPU the convolution strip is the faster and is exact.
    """
    if images.device.type != "cuda":
        return False
    if images.dtype in (torch.float16, torch.bfloat16) or _autocast_on("cuda"):
        return True
    return not (cuda_tf32("conv") or cuda_tf32("matmul"))


def cuda_tf32(op: str) -> bool:
    """Whether CUDA rounds the inputs of float32 ``op`` ("conv": cuDNN, "matmul": cuBLAS) to TF32.

    Reads the ``fp32_precision`` settings where torch has them (a level set to "none" defers to the one
    above it), else the older ``allow_tf32`` flags; reading ``torch.backends.cudnn.allow_tf32`` raises once
    the newer settings give cuDNN's convolutions and RNNs different precisions.
    """
    if op == "conv":
        levels, legacy = (getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn, torch.backends), "cudnn"
    elif op == "matmul":
        levels, legacy = (torch.backends.cuda.matmul, torch.backends), "matmul"
    else:
        raise ValueError(f"op must be 'conv' or 'matmul', got {op!r}")
    if getattr(levels[0], "fp32_precision", None) is None:
        return bool(torch.backends.cudnn.allow_tf32 if legacy == "cudnn" else torch.backends.cuda.matmul.allow_tf32)
    for level in levels:
        precision = getattr(level, "fp32_precision", "none")
        if precision != "none":
            return precision == "tf32"
    return False


def _widen_mlp(block: nn.Module, extra: int) -> None:
    """Give a timm block's MLP branch ``extra`` more input channels: its second norm and first linear layer
    widen (DVT's feature reuse concatenates earlier features there); the residual keeps its width."""
    norm, fc1 = block.norm2, block.mlp.fc1
    if not isinstance(norm, nn.LayerNorm) or not isinstance(fc1, nn.Linear):
        raise ValueError("mlp_extra_channels needs blocks whose MLP branch is LayerNorm then Linear (DeiT/ViT style)")
    block.norm2 = nn.LayerNorm(
        norm.normalized_shape[0] + extra, eps=norm.eps, elementwise_affine=norm.elementwise_affine
    )
    block.mlp.fc1 = nn.Linear(fc1.in_features + extra, fc1.out_features, bias=fc1.bias is not None)


def _grid_key(grid: Grid) -> str:
    return f"{grid[0]}x{grid[1]}"


@register("backbone", "timm_vit")
class TimmViT(Backbone):
    """Any timm ``VisionTransformer`` with one position table per stage grid.

    The wrapped model is ``self.model``: its patch embedding, CLS token,
    blocks, final norm and head are used unchanged, and its own position
    table serves the full-resolution grid. Each smaller stage grid gets its
    own learnable table, initialised by resampling the full-resolution one.
    Explicit dimensions (``embed_dim``, ``depth``...) override the
    architecture's, which is how tests build tiny models.
    """

    def __init__(
        self,
        arch: str = "deit_small_patch16_224",
        num_classes: int = 1000,
        checkpoint: str | None = None,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        patch_padding: int = 0,
        mlp_extra_channels: int = 0,
        image_size: int = 224,
        stage_image_sizes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        overrides = {
            "patch_size": patch_size,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
        }
        kwargs = {k: v for k, v in overrides.items() if v is not None}
        if patch_padding < 0:
            raise ValueError(f"patch_padding must be >= 0, got {patch_padding}")
        # a padded patch embedding (DVT's 10x10 tokens: 23 px patches, padding 3) sees the padded image
        timm_size = image_size + 2 * patch_padding
        try:
            model = timm.create_model(
                arch,
                pretrained=False,
                num_classes=num_classes,
                img_size=timm_size,
                drop_rate=drop_rate,
                drop_path_rate=drop_path_rate,
                **kwargs,
            )
        except RuntimeError as exc:
            raise ValueError(f"timm cannot build {arch!r}: {exc}") from exc
        if not isinstance(model, VisionTransformer):
            raise ValueError(f"{arch!r} is a {type(model).__name__}, not a timm VisionTransformer")
        if model.cls_token is None or model.num_prefix_tokens != 1 or model.no_embed_class:
            raise ValueError(
                f"{arch!r} must have exactly one CLS token and a position table that covers it "
                "(DeiT/ViT style); distilled, register-token and no_embed_class models are not supported"
            )
        proj = model.patch_embed.proj
        if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.padding != (0, 0):
            raise ValueError(
                f"{arch!r} does not embed non-overlapping patches with one convolution (kernel = stride, no padding), "
                "which embedding only the selected patches needs; use a DeiT/ViT-style architecture"
            )
        proj.padding = (patch_padding, patch_padding)
        self.patch_padding = patch_padding
        self.model = model
        self.embed_dim = model.embed_dim
        self.num_classes = model.num_classes
        self.depth = len(model.blocks)
        self.patch_size = model.patch_embed.patch_size[0]
        self.in_chans = model.patch_embed.proj.in_channels
        self.native_grid: Grid = tuple(model.patch_embed.grid_size)
        self.stage_pos_embed = nn.ParameterDict()
        for size in stage_image_sizes:
            if (size + 2 * patch_padding) % self.patch_size:
                raise ValueError(
                    f"the stages see {', '.join(f'{s} px' for s in stage_image_sizes)} images of "
                    f"model.image_size={image_size}; each must be a multiple of the patch size {self.patch_size}"
                )
            grid = self.grid_size(size)
            if grid != self.native_grid:
                self.stage_pos_embed[_grid_key(grid)] = nn.Parameter(self._resample_native(grid))
        self._capture: dict[int, Tensor] | None = None  # per-pass records and edits, set by encode
        self._attention_logits: list[Tensor] | None = None
        self._attention_bias: Tensor | None = None
        self._mlp_input: Tensor | None = None
        self._reducer: TokenReducer | None = None  # the reducer acting in the current block, and what it reads
        self._reading: BlockAttention | None = None
        self.mlp_extra_channels = mlp_extra_channels
        # a block type token reduction cannot split (not timm's pre-norm Block); fixed once the model is built
        self._odd_block = next((type(b).__name__ for b in model.blocks if type(b).forward is not Block.forward), None)
        for index, block in enumerate(model.blocks):
            block.attn.qkv.register_forward_hook(functools.partial(self._capture_class_attention, index))
            if mlp_extra_channels:
                _widen_mlp(block, mlp_extra_channels)
                block.norm2.register_forward_pre_hook(self._widen_mlp_input)
        if checkpoint:
            from dynvit.weights import load_backbone_checkpoint

            load_backbone_checkpoint(self, checkpoint)

    # -- geometry -----------------------------------------------------------

    def grid_size(self, image_size: int | Sequence[int]) -> Grid:
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        p, pad = self.patch_size, 2 * self.patch_padding
        if (h + pad) % p or (w + pad) % p:
            padded = f" plus {pad} px of padding" if pad else ""
            raise ValueError(
                f"image size {h}x{w}{padded} is not a multiple of the patch size {p}; use a multiple of {p}"
            )
        return ((h + pad) // p, (w + pad) // p)

    def _resample_native(self, grid: Grid) -> Tensor:
        with torch.no_grad():
            return resample_abs_pos_embed(
                self.model.pos_embed.detach(), new_size=list(grid), old_size=list(self.native_grid), num_prefix_tokens=1
            ).clone()

    def reset_stage_position_embeddings(self) -> None:
        """Resample every smaller stage's table from the full-resolution one (after loading weights)."""
        for key in self.stage_pos_embed:
            grid = tuple(int(x) for x in key.split("x"))
            self.stage_pos_embed[key].data.copy_(self._resample_native(grid))

    def position_embedding(self, grid: Grid) -> Tensor:
        if grid == self.native_grid:
            return self.model.pos_embed
        try:
            return self.stage_pos_embed[_grid_key(grid)]
        except KeyError:
            known = [_grid_key(self.native_grid), *self.stage_pos_embed.keys()]
            raise ValueError(
                f"no position table for a {_grid_key(grid)} grid; this backbone has {', '.join(known)}"
            ) from None

    # -- tokens ---------------------------------------------------------------

    def embed_patches(self, images: Tensor, index: Tensor | None = None) -> Tensor:
        """Patch embeddings of every patch, or of the patches at ``index`` (B, M), in that order.

        The selected patches must round exactly as the whole image's would, or stage 2 drifts from stage 1
        and from timm: on a GPU, float32 convolutions run in TF32 by default and matrix products do not. So
        they go through the same convolution, laid side by side in a strip one patch high, except where a
        matrix product of their pixels rounds alike and is faster (see :func:`_matmul_rounds_like_conv`).
        """
        proj = self.model.patch_embed.proj
        norm = self.model.patch_embed.norm
        if index is None:
            return norm(proj(images).flatten(2).transpose(1, 2))
        if self.patch_padding:
            raise ValueError("a padded patch embedding cannot embed selected patches alone; use patch_padding=0")
        pixels = self._selected_pixels(images, index)
        if _matmul_rounds_like_conv(images):
            return norm(F.linear(pixels, proj.weight.reshape(proj.weight.shape[0], -1), proj.bias))
        b, m = index.shape
        c, p = images.shape[1], self.patch_size
        strip = pixels.reshape(b, m, c, p, p).permute(0, 2, 3, 1, 4).reshape(b, c, p, m * p)
        return norm(proj(strip).flatten(2).transpose(1, 2))

    def _selected_pixels(self, images: Tensor, index: Tensor) -> Tensor:
        """(B, M, C * p * p): each selected patch's pixels, flattened channel-major like the conv weight."""
        p = self.patch_size
        b, c, h, w = images.shape
        pixels = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return torch.gather(pixels, 1, index.unsqueeze(-1).expand(-1, -1, pixels.shape[-1]))

    def encode(self, tokens: Tensor, cls_position: Tensor, context: StageContext | None = None) -> BackboneOutput:
        """timm's blocks, final norm and head over CLS + ``tokens``.

        Without hooks, a reducer or per-block records the blocks run as timm
        runs them (``model.blocks(x)``, fused attention); CLS attention rows
        come from a hook on each block's ``qkv``. Hooks' attention biases and
        ToMe's size bias go to timm's own ``attn_mask`` argument, so the fused
        kernel stays. A block where a token reducer acts runs as timm's two
        residual branches with the reduction between them.
        """
        model = self.model
        cls = (model.cls_token + cls_position).expand(tokens.shape[0], -1, -1)
        x = model.pos_drop(torch.cat([cls, tokens], dim=1))
        x = model.norm_pre(x)
        context = context or StageContext(index=0, grid=(0, 0))
        reducer = context.reducer
        if reducer is not None:
            self._check_reducible(context)
        edits = [hook.prepare(context, self) for hook in context.hooks]
        per_block = bool(edits) or context.record_attention_logits or context.record_block_tokens or reducer is not None
        self._capture = {b: None for b in context.attention_blocks} if context.attention_blocks else None
        self._attention_logits = [] if context.record_attention_logits else None
        block_tokens = [] if context.record_block_tokens else None
        groups: TokenGroups | None = None  # set once the reducer has acted
        try:
            if not per_block:
                x = model.blocks(x)
            for index, block in enumerate(model.blocks if per_block else ()):
                biases = [e.attention_bias(index) for e in edits if e.attention_bias is not None]
                extra = [e.mlp_input(index) for e in edits if e.mlp_input is not None]
                if groups is not None and reducer.proportional_attention:
                    biases.append(_size_bias(groups.sizes))
                bias = _sum_present(biases)
                self._attention_bias = bias
                self._mlp_input = _concat_present(extra)
                mask = None if bias is None else bias.to(x.dtype)
                if reducer is None or not reducer.reduces_at(index, self.depth):
                    x = block(x, attn_mask=mask)
                    self._spread_captured(index, groups)
                else:
                    self._reducer, self._reading = reducer, BlockAttention()
                    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=mask)))
                    self._spread_captured(index, groups)
                    if groups is None:
                        groups = TokenGroups.identity(x.shape[0], x.shape[1] - 1, x.device)
                    x, groups = reducer(x, self._reading, groups, index)
                    self._reducer = self._reading = None
                    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
                if block_tokens is not None:
                    block_tokens.append(x)
            captured = self._capture or {}
            attention_logits = self._attention_logits
        finally:
            self._capture = self._attention_logits = self._attention_bias = self._mlp_input = None
            self._reducer = self._reading = None
        x = model.norm(x)
        logits = model.forward_head(x)
        if groups is not None:  # later stages index the original grid
            x = torch.cat([x[:, :1], groups.spread_tokens(x[:, 1:])], dim=1)
        return BackboneOutput(
            logits=logits,
            tokens=x,
            class_attention=dict(captured),
            attention_logits=attention_logits,
            block_tokens=block_tokens,
        )

    def _check_reducible(self, context: StageContext) -> None:
        """Token reduction splits timm's ``Block`` between its branches and reads CLS alone at the head; refuse
        what it cannot serve rather than compute something else."""
        if self.model.global_pool != "token":
            raise ValueError(
                f"token reduction needs a CLS-token head; this model pools {self.model.global_pool!r} "
                "(build it with global_pool='token')"
            )
        odd = self._odd_block
        if odd is not None:
            raise ValueError(f"token reduction runs timm's pre-norm Block in two halves; this model has {odd} blocks")
        if context.hooks or context.record_attention_logits or context.record_block_tokens:
            raise ValueError(
                "token reduction changes the sequence every later block sees; it cannot share a stage with "
                "encoder hooks, or run in a stage whose per-block records a later stage's hooks read (DVT's reuse)"
            )

    def _spread_captured(self, index: int, groups: TokenGroups | None) -> None:
        """A recorded CLS attention row of a reduced sequence, handed back over the original tokens."""
        if groups is not None and self._capture is not None and self._capture.get(index) is not None:
            self._capture[index] = groups.spread_attention(self._capture[index])

    def _capture_class_attention(self, index: int, module: nn.Module, args: tuple, qkv: Tensor) -> None:
        """qkv hook: the CLS query's attention row, computed alone (timm keeps its fused kernel).

        When a later stage asks for attention logits, the whole scaled
        logit map (bias included, as the softmax sees it) is recorded too.
        A token reducer acting in this block gets the CLS row (with its
        gradient: EViT weighs the tokens it fuses by it) and the keys.
        """
        reading, reducer = self._reading, self._reducer
        if self._capture is None and self._attention_logits is None and reading is None:
            return
        attn = self.model.blocks[index].attn
        b, n, _ = qkv.shape
        qkv = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim)
        if self._attention_logits is not None:
            q = attn.q_norm(qkv[:, :, 0].transpose(1, 2)) * attn.scale  # (B, H, N, d)
            logits = q @ attn.k_norm(qkv[:, :, 1].transpose(1, 2)).transpose(-2, -1)
            self._attention_logits.append(logits if self._attention_bias is None else logits + self._attention_bias)
        if reading is not None and reducer.reads_keys:
            reading.keys = attn.k_norm(qkv[:, 1:, 1].detach()).mean(dim=2)  # (B, L, d), head-mean
        capture = self._capture is not None and index in self._capture
        for_reducer = reading is not None and reducer.reads_class_attention
        if not (capture or for_reducer):
            return
        source = qkv if for_reducer else qkv.detach()
        q = attn.q_norm(source[:, 0, 0]) * attn.scale  # (B, H, d): the CLS query alone
        k = attn.k_norm(source[:, :, 1])  # (B, N, H, d), a strided view, no copy
        scores = torch.einsum("bhd,bnhd->bhn", q, k)
        if self._attention_bias is not None:
            scores = scores + self._attention_bias[:, :, 0].expand_as(scores)
        row = scores.float().softmax(dim=-1)[:, :, 1:].mean(dim=1)  # (B, L)
        if for_reducer:
            reading.class_attention = row
        if capture:
            self._capture[index] = row.detach()

    def _widen_mlp_input(self, module: nn.Module, args: tuple) -> tuple[Tensor]:
        """norm2 pre-hook of a backbone with extra MLP input channels: hooks' channels, or zeros, appended."""
        (x,) = args
        extra = self._mlp_input
        if extra is None:  # the extra channels' source is switched off: they read zero
            extra = x.new_zeros(*x.shape[:-1], self.mlp_extra_channels)
        if extra.shape[-1] != self.mlp_extra_channels:
            raise ValueError(
                f"hooks give {extra.shape[-1]} extra MLP input channels; this backbone takes "
                f"mlp_extra_channels={self.mlp_extra_channels}"
            )
        return (torch.cat([x, extra.to(x.dtype)], dim=-1),)


def _size_bias(sizes: Tensor) -> Tensor:
    """(B, L) token sizes -> (B, 1, 1, 1 + L) additive attention bias log(size) (ToMe's proportional attention):
    a key that stands for s tokens weighs like s equal keys; CLS holds itself."""
    return torch.cat([sizes.new_zeros(sizes.shape[0], 1), sizes.log()], dim=1)[:, None, None, :]


def _sum_present(values: list[Tensor | None]) -> Tensor | None:
    present = [v for v in values if v is not None]
    return sum(present[1:], present[0]) if present else None


def _concat_present(values: list[Tensor | None]) -> Tensor | None:
    present = [v for v in values if v is not None]
    return torch.cat(present, dim=-1) if present else None
