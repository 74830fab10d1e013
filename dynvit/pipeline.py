"""The dynamic pipeline: stages composed into one ``nn.Module``.

Training (``pipe(images)``): every sample goes through every stage and the
logits of each stage are returned, so the loss can supervise both.
Inference (``pipe.infer(images)``): stage 1 on the whole batch, the exit
policy splits it, and stage 2 runs once on the compacted sub-batch of the
samples that did not exit.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dynvit.errors import DynvitError
from dynvit.recipe import PLUGIN_SECTIONS, RecipeError
from dynvit.registry import PluginError, registry
from dynvit.stages import (
    Backbone,
    Downsampler,
    ExitPolicy,
    Fuser,
    Grid,
    Loss,
    RegionSelector,
    Selection,
    Stage1Output,
    TokenReuser,
)

if TYPE_CHECKING:  # dynvit.cascade imports this module
    from dynvit.cascade import CompiledCascade


class InputError(DynvitError, ValueError):
    """Images the model cannot read (shape, channels, dtype, non-finite pixels); the message names the fix."""


@dataclass
class PipelineOutput:
    """Training-mode result."""

    logits: tuple[Tensor, ...]  # one (B, C) tensor per stage
    selection: Selection | None = None  # what stage 2 looked at


@dataclass
class InferenceResult:
    """Inference-mode result."""

    logits: Tensor  # (B, C): the logits of the stage each sample exited at
    exit_stage: Tensor  # (B,) int64 in {1, 2}
    stage1_logits: Tensor  # (B, C)
    selection: Selection | None = None  # for the samples with exit_stage == 2, in batch order


@dataclass
class Stage2Inputs:
    """Everything stage 2 needs besides the images; every field has the sub-batch as its first dimension.

    ``full_index`` (B, M): full-resolution cells to embed; ``parent`` (B, M): each cell's parent as a slot in
    ``kept_tokens`` (B, K, D), the final stage-1 tokens the fuser reads (both None without a fuser);
    ``reused`` (B, R, D): the stage-1 tokens appended to the sequence (None without a reuser).
    """

    full_index: Tensor
    parent: Tensor | None = None
    kept_tokens: Tensor | None = None
    reused: Tensor | None = None


def parent_index(full_index: Tensor, grid1: Grid, grid2: Grid) -> Tensor:
    """Stage-1 cell under each full-resolution cell (nearest-neighbour upsampling)."""
    rows, cols = full_index // grid2[1], full_index % grid2[1]
    return (rows * grid1[0] // grid2[0]) * grid1[1] + cols * grid1[1] // grid2[1]


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """(B or 1, N, D) tokens at (B, M) indices -> (B, M, D)."""
    index = index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.gather(tokens.expand(index.shape[0], -1, -1), 1, index)


class DynamicPipeline(nn.Module):
    """LF-ViT-style two-stage inference over one shared backbone."""

    def __init__(
        self,
        backbone: Backbone,
        downsampler: Downsampler | None,
        selector: RegionSelector | None,
        fuser: Fuser | None,
        reuser: TokenReuser | None,
        exit_policy: ExitPolicy | None,
        loss: Loss | None = None,
        image_size: int = 224,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.downsampler = downsampler
        self.selector = selector
        self.fuser = fuser
        self.reuser = reuser
        self.exit_policy = exit_policy
        self.loss = loss
        self.image_size = image_size
        self.num_stages = 1 if downsampler is None else 2
        with _naming("model.image_size"):
            self.grid2 = backbone.grid_size(image_size)
        if self.num_stages == 2:
            low = downsampler.output_size(image_size)
            with _naming(f"model.downsampler (a {low} px stage-1 image from model.image_size={image_size})"):
                self.grid1 = backbone.grid_size(low)
                if self.grid2[0] % self.grid1[0] or self.grid2[1] % self.grid1[1]:
                    raise ValueError(
                        f"the full-resolution grid {self.grid2} is not an integer multiple of the stage-1 grid "
                        f"{self.grid1}; use a downsampling scale of 1/2, 1/3, ..."
                    )
            with _naming("model.selector"):
                self._attention_blocks = selector.attention_blocks(backbone.depth)
                self.stage2_length  # noqa: B018 - the selector checks its region against the stage-1 grid
        # while True, stage 2 sees the whole image (the first LF-ViT training phase)
        self.whole_image_stage2 = False

    # -- the two stages ---------------------------------------------------------

    def _check_images(self, images: Tensor, check_finite: bool) -> Tensor:
        """Refuse what the model cannot read, naming the fix; other floating dtypes are cast to the weights'.

        Non-finite pixels are refused with the sample indices (a NaN image
        would otherwise get NaN logits and a confident-looking class 0). The
        check costs a host sync, so training-mode forwards skip it: there the
        trainer's non-finite loss check stops the run instead.
        """
        if not isinstance(images, Tensor):
            raise InputError(f"images must be a torch.Tensor of shape (B, 3, H, W), got a {type(images).__name__}")
        size, channels = self.image_size, self.backbone.in_chans
        if images.ndim != 4 or tuple(images.shape[-2:]) != (size, size):
            raise InputError(
                f"expected images of shape (B, {channels}, {size}, {size}) (model.image_size={size}), "
                f"got {tuple(images.shape)}; resize or change model.image_size"
            )
        if images.shape[1] != channels:
            fix = (
                "repeat a grey channel with images.expand(-1, 3, -1, -1)"
                if images.shape[1] == 1
                else "drop an alpha channel with images[:, :3]"
                if images.shape[1] == 4 and channels == 3
                else f"convert them to {channels} channels"
            )
            raise InputError(f"expected {channels}-channel images, got {images.shape[1]} channels; {fix}")
        if not images.is_floating_point():
            raise InputError(
                f"images are {images.dtype}; the model takes normalised floating-point images: "
                "images.float() / 255, then subtract the recipe's data.mean and divide by data.std"
            )
        if check_finite and images.numel():
            bad = ~torch.isfinite(images).flatten(1).all(dim=1)
            if bad.any():
                index = torch.nonzero(bad).flatten().tolist()
                shown = ", ".join(map(str, index[:10])) + (", ..." if len(index) > 10 else "")
                raise InputError(
                    f"{len(index)} of {images.shape[0]} images contain NaN or infinite pixels (batch indices "
                    f"{shown}); fix or drop them: non-finite input gives meaningless predictions"
                )
        return images.to(self.backbone.dtype)

    def _empty_selection(self, device: torch.device) -> Selection:
        if self.whole_image_stage2:
            return Selection.whole_image(0, self.grid1, self.grid2, device)
        computed, reused = self.selector.num_tokens(self.grid1, self.grid2, self.backbone.depth)
        kept = computed * self.grid1[0] * self.grid1[1] // (self.grid2[0] * self.grid2[1])
        empty = functools.partial(torch.zeros, dtype=torch.long, device=device)
        return Selection(empty(0, computed), empty(0, reused), empty(0, 4), empty(0, kept))

    def run_full_resolution(self, images: Tensor) -> Tensor:
        """The plain backbone on the whole full-resolution image: (B, C) logits."""
        pos = self.backbone.position_embedding(self.grid2)
        tokens = self.backbone.embed_patches(images) + pos[:, 1:]
        return self.backbone.encode(tokens, pos[:, :1]).logits

    def run_stage1(self, images: Tensor) -> Stage1Output:
        """Stage 1 on the downsampled images."""
        low = self.downsampler(images)
        grid = self.backbone.grid_size(tuple(low.shape[-2:]))
        if grid != self.grid1:
            raise ValueError(f"downsampler produced a {grid} grid, expected {self.grid1}")
        pos = self.backbone.position_embedding(grid)
        embeddings = self.backbone.embed_patches(low) + pos[:, 1:]
        out = self.backbone.encode(embeddings, pos[:, :1], self._attention_blocks)
        return Stage1Output(
            logits=out.logits,
            tokens=out.tokens,
            class_attention=out.class_attention,
            embeddings=embeddings,
            grid=grid,
        )

    def select(self, stage1: Stage1Output) -> Selection:
        if self.whole_image_stage2:
            return Selection.whole_image(stage1.logits.shape[0], self.grid1, self.grid2, stage1.logits.device)
        return self.selector(stage1, self.grid2)

    def stage2_inputs(self, stage1: Stage1Output, selection: Selection) -> Stage2Inputs:
        """What stage 2 takes from stage 1 for these samples: indices and the gathered stage-1 tokens."""
        parent = kept_tokens = reused = None
        if self.fuser is not None:
            # the fuser sees only the kept stage-1 tokens, and each patch's parent as a slot among them
            kept = selection.kept
            slot = torch.empty(kept.shape[0], self.grid1[0] * self.grid1[1], dtype=kept.dtype, device=kept.device)
            slot.scatter_(1, kept, torch.arange(kept.shape[1], device=kept.device).expand_as(kept))
            parent = slot.gather(1, parent_index(selection.full_index, self.grid1, self.grid2))
            kept_tokens = gather_tokens(stage1.tokens[:, 1:], kept)
        if self.reuser is not None and selection.reuse_index.shape[1] > 0:
            reused = self.reuser(stage1, selection.reuse_index)
        return Stage2Inputs(selection.full_index, parent, kept_tokens, reused)

    def encode_stage2(self, images: Tensor, inputs: Stage2Inputs) -> Tensor:
        """Stage 2 proper: embed the selected full-resolution patches, fuse, append the reused tokens, encode."""
        patches = self.backbone.embed_patches(images, inputs.full_index)
        if inputs.kept_tokens is not None:
            patches = self.fuser(patches, inputs.kept_tokens, inputs.parent)
        pos = self.backbone.position_embedding(self.grid2)
        tokens = patches + gather_tokens(pos[:, 1:], inputs.full_index)
        if inputs.reused is not None:
            tokens = torch.cat([tokens, inputs.reused.to(tokens.dtype)], dim=1)
        return self.backbone.encode(tokens, pos[:, :1]).logits

    def run_stage2(self, images: Tensor, stage1: Stage1Output, selection: Selection) -> Tensor:
        """Stage 2 on the selected full-resolution tokens plus the reused stage-1 ones."""
        return self.encode_stage2(images, self.stage2_inputs(stage1, selection))

    # -- public entry points ----------------------------------------------------

    def forward(self, images: Tensor) -> PipelineOutput:
        """Every sample through every stage (training; eta = 1)."""
        images = self._check_images(images, check_finite=not self.training)
        if images.shape[0] == 0:
            empty = images.new_zeros(0, self.backbone.num_classes)
            selection = None if self.num_stages == 1 else self._empty_selection(images.device)
            return PipelineOutput(logits=(empty,) * self.num_stages, selection=selection)
        if self.num_stages == 1:
            return PipelineOutput(logits=(self.run_full_resolution(images),))
        stage1 = self.run_stage1(images)
        selection = self.select(stage1)
        logits2 = self.run_stage2(images, stage1, selection)
        return PipelineOutput(logits=(stage1.logits, logits2), selection=selection)

    def compile(
        self, mode: str | None = None, buckets: Sequence[int] | None = None, **compile_kwargs: object
    ) -> DynamicPipeline:
        """Make :meth:`infer` run through two static-shape graphs under ``torch.compile`` (returns ``self``).

        Stage 1 and stage 2 each compile as one graph; the stage-2 sub-batch
        is padded to a few bucket sizes (see :mod:`dynvit.cascade`). On CUDA
        ``mode`` defaults to ``"reduce-overhead"`` (CUDA graphs). Results equal
        eager ``infer`` up to floating-point reassociation. Training
        (``forward``) is not affected.
        """
        from dynvit.cascade import CompiledCascade

        # kept out of the module tree: the cascade holds this pipeline, not the other way round
        object.__setattr__(self, "_cascade", CompiledCascade(self, mode=mode, buckets=buckets, **compile_kwargs))
        return self

    @property
    def compiled(self) -> bool:
        """Whether :meth:`infer` runs compiled (see :meth:`compile`)."""
        return self.__dict__.get("_cascade") is not None

    @property
    def compiled_cascade(self) -> CompiledCascade | None:
        """The :class:`~dynvit.cascade.CompiledCascade` :meth:`infer` runs through, or None."""
        return self.__dict__.get("_cascade")

    @torch.no_grad()
    def infer(self, images: Tensor, threshold: float | None = None) -> InferenceResult:
        """Early-exit inference; ``threshold`` overrides the exit policy's own."""
        images = self._check_images(images, check_finite=True)
        if images.shape[0] == 0:
            empty = images.new_zeros(0, self.backbone.num_classes)
            return InferenceResult(empty, torch.zeros(0, dtype=torch.long, device=images.device), empty)
        cascade = self.__dict__.get("_cascade")
        if cascade is not None:
            return cascade.infer(images, threshold, checked=True)
        if self.num_stages == 1:
            logits = self.run_full_resolution(images)
            ones = torch.ones(logits.shape[0], dtype=torch.long, device=logits.device)
            return InferenceResult(logits=logits, exit_stage=ones, stage1_logits=logits)
        stage1 = self.run_stage1(images)
        exits = self.exit_policy(stage1.logits, threshold)
        exit_stage = torch.where(exits, 1, 2)
        logits = stage1.logits.clone()
        # select for the whole batch before the host waits on the exit decision: the GPU keeps busy
        selection = self.select(stage1)
        remaining = torch.nonzero(~exits).squeeze(1)
        if remaining.numel() > 0:
            selection = selection.take(remaining)
            sub = stage1.take(remaining, with_attention=False)
            logits[remaining] = self.run_stage2(images[remaining], sub, selection).to(logits.dtype)
        else:
            selection = None
        return InferenceResult(logits=logits, exit_stage=exit_stage, stage1_logits=stage1.logits, selection=selection)

    def compute_loss(self, output: PipelineOutput, target: Tensor) -> Tensor:
        if self.loss is None:
            raise RuntimeError("this pipeline was built without a loss; give the recipe a 'loss' section")
        return self.loss(output.logits, target)

    @property
    def stage2_length(self) -> int:
        """Tokens stage 2 processes, CLS included (fixed for a recipe)."""
        if self.num_stages == 1:
            return 1 + self.grid2[0] * self.grid2[1]
        computed, reused = self.selector.num_tokens(self.grid1, self.grid2, self.backbone.depth)
        return 1 + computed + (reused if self.reuser is not None else 0)


@contextlib.contextmanager
def _naming(key: str) -> Iterator[None]:
    """Prefix a plugin's ``ValueError`` with the recipe key it comes from."""
    try:
        yield
    except (RecipeError, PluginError):
        raise
    except ValueError as exc:
        raise RecipeError(f"{key}: {exc}") from None


def build_pipeline(recipe: DictConfig, with_loss: bool = True) -> DynamicPipeline:
    """Instantiate every stage a recipe names and compose them.

    A stage's constructor or the geometry refusing a value raises
    :class:`~dynvit.recipe.RecipeError` naming the recipe key.
    """
    model = recipe.model
    image_size = int(model.image_size)
    sections = {kind: dotted for dotted, kind in PLUGIN_SECTIONS.items()}  # stage kind -> its recipe key

    def build(kind: str, section: DictConfig, **context: object) -> nn.Module:
        config = OmegaConf.to_container(section, resolve=True)
        with _naming(f"{sections[kind]} ({config.get('type')})"):
            try:
                return registry(kind).build(config, **context)
            except TypeError as exc:  # a constructor refusing an argument's type
                raise ValueError(str(exc)) from None

    downsampler = None
    stage_sizes: Sequence[int] = (image_size,)
    if model.stages == 2:
        downsampler = build("downsampler", model.downsampler)
        stage_sizes = (downsampler.output_size(image_size), image_size)
    backbone = build("backbone", model.backbone, image_size=image_size, stage_image_sizes=tuple(stage_sizes))
    two = model.stages == 2
    selector = build("region_selector", model.selector) if two else None
    fuser = build("fuser", model.fuser, embed_dim=backbone.embed_dim) if two else None
    reuser = build("token_reuser", model.reuser, embed_dim=backbone.embed_dim) if two else None
    exit_policy = build("exit_policy", model.exit) if two else None
    loss = build("loss", recipe.loss) if with_loss else None
    # a no-op fuser or reuser (is_noop) is left out, so stage 2 skips its gathers entirely
    fuser = None if getattr(fuser, "is_noop", False) else fuser
    reuser = None if getattr(reuser, "is_noop", False) else reuser
    return DynamicPipeline(backbone, downsampler, selector, fuser, reuser, exit_policy, loss, image_size)


def check_buildable(recipe: DictConfig, source: str = "recipe") -> None:
    """Build the recipe's pipeline on the meta device (no memory, no weights read) to find what it refuses.

    This is how ``load_recipe`` refuses a region larger than the stage-1
    grid or a ``first_block`` beyond the depth before any work starts.
    """
    recipe = copy.deepcopy(recipe)
    if recipe.model.backbone.get("checkpoint") is not None:
        recipe.model.backbone.checkpoint = None  # read when the real pipeline is built
    try:
        with torch.device("meta"):
            build_pipeline(recipe, with_loss=True)
    except (RecipeError, PluginError) as exc:
        raise RecipeError(f"{source}: {exc}") from None
