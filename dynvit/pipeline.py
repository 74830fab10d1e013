"""The dynamic pipeline: stages composed into one ``nn.Module``.

Training (``pipe(images)``): every sample goes through every stage and
every stage's output is returned, so the loss can supervise them all.
Inference (``pipe.infer(images)``): the first stage on the whole batch;
after each stage its exit policy splits the batch, and the next stage runs
once on the compacted sub-batch of the samples that did not exit.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dynvit.errors import DynvitError
from dynvit.recipe import RecipeError, stage_sections
from dynvit.registry import PluginError, registry
from dynvit.stages import (
    Backbone,
    Downsampler,
    EncoderHook,
    ExitPolicy,
    Fuser,
    Grid,
    Loss,
    PipelineOutput,
    RegionSelector,
    Selection,
    StageContext,
    StageOutput,
    TokenReducer,
    TokenReuser,
    gather_tokens,
)

if TYPE_CHECKING:  # dynvit.cascade imports this module
    from dynvit.cascade import CompiledCascade


class InputError(DynvitError, ValueError):
    """Images the model cannot read (shape, channels, dtype, non-finite pixels); the message names the fix."""


@dataclass
class InferenceResult:
    """Inference-mode result."""

    logits: Tensor  # (B, C): the logits of the stage each sample exited at
    exit_stage: Tensor  # (B,) int64 in {1, ..., number of stages}
    stage1_logits: Tensor  # (B, C): the first stage's logits, every sample
    selection: Selection | None = None  # of the last refining stage, for the samples that reached it, in batch order


@dataclass
class RefineInputs:
    """Everything a refining stage needs besides the images; every field has the sub-batch as its first dimension.

    ``full_index`` (B, M): cells of this stage's grid to embed; ``parent`` (B, M): each cell's parent as a slot in
    ``kept_tokens`` (B, K, D), the previous stage's final tokens the fuser reads (both None without a fuser);
    ``reused`` (B, R, D): the previous stage's tokens appended to the sequence (None without a reuser).
    """

    full_index: Tensor
    parent: Tensor | None = None
    kept_tokens: Tensor | None = None
    reused: Tensor | None = None


Stage2Inputs = RefineInputs  # the name of the two-stage era


def parent_index(full_index: Tensor, grid1: Grid, grid2: Grid) -> Tensor:
    """Coarser-grid cell under each finer-grid cell (nearest-neighbour upsampling)."""
    rows, cols = full_index // grid2[1], full_index % grid2[1]
    return (rows * grid1[0] // grid2[0]) * grid1[1] + cols * grid1[1] // grid2[1]


class PipelineStage(nn.Module):
    """One stage: where its tokens come from, the backbone it runs (when not the shared one), its hooks, and
    whether samples may stop after it.

    A *whole-image* stage embeds every patch of the (optionally downsampled)
    image. A *refining* stage (one with a selector) embeds only the cells
    the selector picks at its own resolution from what the previous stage
    saw, optionally fused with and completed by that stage's tokens.
    """

    def __init__(
        self,
        backbone: Backbone | None = None,
        downsampler: Downsampler | None = None,
        selector: RegionSelector | None = None,
        fuser: Fuser | None = None,
        reuser: TokenReuser | None = None,
        hooks: Sequence[EncoderHook] = (),
        exit_policy: ExitPolicy | None = None,
        reducer: TokenReducer | None = None,
    ) -> None:
        super().__init__()
        if selector is not None and downsampler is not None:
            raise ValueError("a refining stage (one with a selector) reads the full image; remove its downsampler")
        if selector is None and (fuser is not None or reuser is not None):
            raise ValueError("a fuser or reuser needs a selector in the same stage")
        self.backbone = backbone
        self.downsampler = downsampler
        self.selector = selector
        # a no-op fuser or reuser is left out, so the stage skips its gathers entirely
        self.fuser = None if fuser is None or fuser.is_noop else fuser
        self.reuser = None if reuser is None or reuser.is_noop else reuser
        self.hooks = nn.ModuleList(hooks)
        self.exit_policy = exit_policy
        if reducer is not None and not reducer.is_noop and hooks:
            raise ValueError("token reduction cannot share a stage with encoder hooks: they edit every token")
        self.reducer = None if reducer is None or reducer.is_noop else reducer

    @property
    def refines(self) -> bool:
        return self.selector is not None


# two-stage attribute names (pipe.selector, ...) -> (stage, attribute)
_TWO_STAGE_ALIASES = {
    "downsampler": (0, "downsampler"),
    "exit_policy": (0, "exit_policy"),
    "selector": (1, "selector"),
    "fuser": (1, "fuser"),
    "reuser": (1, "reuser"),
}


# where a two-stage pipeline kept its plugins before the stages were a list -> where they are now
_LEGACY_PREFIXES = {
    "downsampler.": "stages.0.downsampler.",
    "exit_policy.": "stages.0.exit_policy.",
    "selector.": "stages.1.selector.",
    "fuser.": "stages.1.fuser.",
    "reuser.": "stages.1.reuser.",
}


def upgrade_state_dict_keys(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """A two-stage state dict written before the stage list, under today's key names.

    ``fuser.block.0.weight`` becomes ``stages.1.fuser.block.0.weight``;
    other keys are kept, so today's state dicts pass through unchanged.
    """
    upgraded = {}
    for key, value in state.items():
        rest = key[len(prefix) :] if key.startswith(prefix) else None
        old = next((o for o in _LEGACY_PREFIXES if rest is not None and rest.startswith(o)), None)
        upgraded[key if old is None else prefix + _LEGACY_PREFIXES[old] + rest[len(old) :]] = value
    return upgraded


class DynamicPipeline(nn.Module):
    """Stages run in order over one shared backbone (or each over its own), with exits between them.

    LF-ViT and CF-ViT are two stages sharing a backbone: a downsampled
    whole-image stage, then a refining stage. DVT is three whole-image
    stages with their own backbones. ``pipe.selector``, ``pipe.grid1`` and
    the other two-stage names read (and set) the stages of such a pipeline.
    """

    def __init__(
        self,
        backbone: Backbone,
        stages: Sequence[PipelineStage],
        loss: Loss | None = None,
        image_size: int = 224,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.stages = nn.ModuleList(stages)
        self.loss = loss
        self.image_size = image_size
        self.num_stages = len(stages)
        self.grids: list[Grid] = []
        for index, stage in enumerate(stages):
            key = f"model.stages.{index}" if index > 1 or self.num_stages > 2 else "model"
            if stage.refines:
                if index == 0 or stages[index - 1].refines:
                    raise RecipeError(
                        f"{key}: a stage with a selector refines what a whole-image stage before it saw; "
                        "put a whole-image stage (no selector) before it"
                    )
                with _naming(f"{key}.image_size"):
                    grid = self.backbone_of(index).grid_size(image_size)
                    previous = self.grids[index - 1]
                    if grid[0] % previous[0] or grid[1] % previous[1]:
                        raise ValueError(
                            f"the grid {grid} of stage {index + 1} is not an integer multiple of the grid {previous} "
                            f"of stage {index}; use a downsampling scale of 1/2, 1/3, ..."
                        )
            else:
                side = image_size if stage.downsampler is None else stage.downsampler.output_size(image_size)
                where = f"model.downsampler (a {side} px image from model.image_size={image_size})"
                with _naming(where if stage.downsampler is not None else "model.image_size"):
                    grid = self.backbone_of(index).grid_size(side)
            self.grids.append(grid)
        # what each stage records because the next one asks for it
        self._attention_blocks: list[tuple[int, ...]] = [() for _ in stages]
        self._records: list[tuple[bool, bool]] = [(False, False) for _ in stages]
        for index, stage in enumerate(stages[1:], start=1):
            if stage.refines:
                with _naming(f"{'model' if self.num_stages == 2 else f'model.stages.{index}'}.selector"):
                    depth = self.backbone_of(index - 1).depth
                    self._attention_blocks[index - 1] = tuple(stage.selector.attention_blocks(depth))
                    self.stage_length(index)  # the selector checks its region against the previous grid
            self._records[index - 1] = (
                any(h.needs_attention_logits for h in stage.hooks),
                any(h.needs_block_tokens for h in stage.hooks),
            )
            if any(self._records[index - 1]) and stages[index - 1].reducer is not None:
                raise RecipeError(
                    f"model.reduction: stage {index} reduces its tokens, but stage {index + 1}'s hooks read its "
                    "per-block records over every token; reduce in another stage"
                )
        for index, stage in enumerate(stages):
            if stage.reducer is not None:
                with _naming("model.reduction"):
                    depth = self.backbone_of(index).depth
                    stage.reducer.check(depth)
        # while True, every refining stage sees the whole image (the first LF-ViT/CF-ViT training phase)
        self.whole_image_stage2 = False
        if self.num_stages == 2:  # checkpoints of the two-stage era load as they did
            self.register_load_state_dict_pre_hook(_upgrade_loaded_keys)

    # -- structure --------------------------------------------------------------

    def backbone_of(self, index: int) -> Backbone:
        """The backbone stage ``index`` runs: its own, or the shared one."""
        own = self.stages[index].backbone
        return self.backbone if own is None else own

    def stage_length(self, index: int) -> int:
        """Tokens stage ``index`` processes, CLS included (fixed for a recipe)."""
        stage, grid = self.stages[index], self.grids[index]
        if not stage.refines:
            return 1 + grid[0] * grid[1]
        computed, reused = stage.selector.num_tokens(self.grids[index - 1], grid, self.backbone_of(index - 1).depth)
        return 1 + computed + (reused if stage.reuser is not None else 0)

    def block_lengths(self, index: int) -> tuple[int, ...]:
        """Tokens (CLS included) leaving each block of stage ``index``: fixed by the recipe, fewer after every
        block where the stage's token reducer acts."""
        reducer, depth = self.stages[index].reducer, self.backbone_of(index).depth
        length, lengths = self.stage_length(index) - 1, []
        for block in range(depth):
            if reducer is not None and reducer.reduces_at(block, depth):
                length = reducer.reduced_length(length, block)
            lengths.append(1 + length)
        return tuple(lengths)

    def __getattr__(self, name: str) -> object:
        alias = _TWO_STAGE_ALIASES.get(name)
        if alias is not None and "stages" in self._modules:
            return getattr(self.stages[alias[0]], alias[1]) if self.num_stages == 2 else None
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: object) -> None:
        alias = _TWO_STAGE_ALIASES.get(name)
        if alias is not None and "stages" in self.__dict__.get("_modules", {}):
            if self.num_stages != 2:
                raise AttributeError(f"pipe.{name} names a plugin of a two-stage pipeline; use pipe.stages[i].{name}")
            setattr(self.stages[alias[0]], alias[1], value)
            return
        super().__setattr__(name, value)

    @property
    def grid1(self) -> Grid:
        """The first stage's grid."""
        return self.grids[0]

    @property
    def grid2(self) -> Grid:
        """The full-resolution grid (the last stage's)."""
        return self.grids[-1] if self.num_stages > 1 else self.backbone.grid_size(self.image_size)

    @property
    def stage2_length(self) -> int:
        """Tokens the last stage processes, CLS included."""
        return self.stage_length(self.num_stages - 1)

    # -- running the stages -------------------------------------------------------

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
        # one pass first: a sum is finite only if every pixel is (a finite sum that overflows is checked in full)
        if check_finite and images.numel() and not bool(torch.isfinite(images.sum(dtype=torch.float32))):
            bad = ~torch.isfinite(images).flatten(1).all(dim=1)
            if bad.any():
                index = torch.nonzero(bad).flatten().tolist()
                shown = ", ".join(map(str, index[:10])) + (", ..." if len(index) > 10 else "")
                raise InputError(
                    f"{len(index)} of {images.shape[0]} images contain NaN or infinite pixels (batch indices "
                    f"{shown}); fix or drop them: non-finite input gives meaningless predictions"
                )
        return images.to(self.backbone.dtype)

    def _context(self, index: int, previous: StageOutput | None) -> StageContext:
        logits, tokens = self._records[index]
        return StageContext(
            index=index,
            grid=self.grids[index],
            previous=previous,
            attention_blocks=self._attention_blocks[index],
            record_attention_logits=logits,
            record_block_tokens=tokens,
            hooks=tuple(self.stages[index].hooks),
            reducer=self.stages[index].reducer,
        )

    def _empty_selection(self, index: int, device: torch.device) -> Selection:
        grid1, grid2 = self.grids[index - 1], self.grids[index]
        if self.whole_image_stage2:
            return Selection.whole_image(0, grid1, grid2, device)
        computed, reused = self.stages[index].selector.num_tokens(grid1, grid2, self.backbone_of(index - 1).depth)
        kept = computed * grid1[0] * grid1[1] // (grid2[0] * grid2[1])
        empty = functools.partial(torch.zeros, dtype=torch.long, device=device)
        return Selection(empty(0, computed), empty(0, reused), empty(0, 4), empty(0, kept))

    @property
    def full_resolution_backbone(self) -> Backbone:
        """The backbone of the last stage: what the pipeline's savings are measured against."""
        return self.backbone_of(self.num_stages - 1)

    def run_full_resolution(self, images: Tensor) -> Tensor:
        """The last stage's backbone alone on the whole full-resolution image: (B, C) logits (the baseline)."""
        backbone = self.full_resolution_backbone
        pos = backbone.position_embedding(backbone.grid_size(self.image_size))
        tokens = backbone.embed_patches(images) + pos[:, 1:]
        return backbone.encode(tokens, pos[:, :1]).logits

    def run_whole_image(self, index: int, images: Tensor, previous: StageOutput | None = None) -> StageOutput:
        """A whole-image stage: every patch of the (downsampled) image."""
        stage, backbone = self.stages[index], self.backbone_of(index)
        image = images if stage.downsampler is None else stage.downsampler(images)
        grid = backbone.grid_size(tuple(image.shape[-2:]))
        if grid != self.grids[index]:
            raise ValueError(f"stage {index + 1} got a {grid} grid from its input, expected {self.grids[index]}")
        pos = backbone.position_embedding(grid)
        embeddings = backbone.embed_patches(image) + pos[:, 1:]
        out = backbone.encode(embeddings, pos[:, :1], self._context(index, previous))
        return StageOutput(**vars(out), embeddings=embeddings, grid=grid)

    def select(self, stage1: StageOutput, index: int = 1) -> Selection:
        """The refining stage ``index``'s selection from the previous stage's output."""
        grid1, grid2 = self.grids[index - 1], self.grids[index]
        if self.whole_image_stage2:
            return Selection.whole_image(stage1.logits.shape[0], grid1, grid2, stage1.logits.device)
        return self.stages[index].selector(stage1, grid2)

    def refine_inputs(self, stage1: StageOutput, selection: Selection, index: int = 1) -> RefineInputs:
        """What refining stage ``index`` takes from the previous stage: indices and gathered tokens."""
        stage, grid1, grid2 = self.stages[index], self.grids[index - 1], self.grids[index]
        parent = kept_tokens = reused = None
        if stage.fuser is not None:
            # the fuser sees only the kept tokens, and each patch's parent as a slot among them
            kept = selection.kept
            slot = torch.empty(kept.shape[0], grid1[0] * grid1[1], dtype=kept.dtype, device=kept.device)
            slot.scatter_(1, kept, torch.arange(kept.shape[1], device=kept.device).expand_as(kept))
            parent = slot.gather(1, parent_index(selection.full_index, grid1, grid2))
            kept_tokens = gather_tokens(stage1.tokens[:, 1:], kept)
        if stage.reuser is not None and selection.reuse_index.shape[1] > 0:
            reused = stage.reuser(stage1, selection.reuse_index)
        return RefineInputs(selection.full_index, parent, kept_tokens, reused)

    def encode_refined(
        self, images: Tensor, inputs: RefineInputs, index: int = 1, previous: StageOutput | None = None
    ) -> StageOutput:
        """A refining stage proper: embed the selected patches, fuse, append the reused tokens, encode."""
        stage, backbone, grid = self.stages[index], self.backbone_of(index), self.grids[index]
        patches = backbone.embed_patches(images, inputs.full_index)
        if inputs.kept_tokens is not None:
            patches = stage.fuser(patches, inputs.kept_tokens, inputs.parent)
        pos = backbone.position_embedding(grid)
        tokens = patches + gather_tokens(pos[:, 1:], inputs.full_index)
        if inputs.reused is not None:
            tokens = torch.cat([tokens, inputs.reused.to(tokens.dtype)], dim=1)
        out = backbone.encode(tokens, pos[:, :1], self._context(index, previous))
        return StageOutput(**vars(out), grid=grid)

    def run_stage(
        self, index: int, images: Tensor, previous: StageOutput | None = None, selection: Selection | None = None
    ) -> StageOutput:
        """Stage ``index`` on ``images``; ``previous`` is the previous stage's output for the same samples."""
        if not self.stages[index].refines:
            return self.run_whole_image(index, images, previous)
        if selection is None:
            selection = self.select(previous, index)
        out = self.encode_refined(images, self.refine_inputs(previous, selection, index), index, previous)
        out.selection = selection
        return out

    # the two-stage names, for LF-ViT-shaped pipelines and the compiled and exported cascades

    def run_stage1(self, images: Tensor) -> StageOutput:
        """The first stage on the whole batch."""
        return self.run_stage(0, images)

    def stage2_inputs(self, stage1: StageOutput, selection: Selection) -> RefineInputs:
        return self.refine_inputs(stage1, selection, 1)

    def encode_stage2(self, images: Tensor, inputs: RefineInputs) -> Tensor:
        return self.encode_refined(images, inputs, 1).logits

    def run_stage2(self, images: Tensor, stage1: StageOutput, selection: Selection) -> Tensor:
        """The second stage's logits given the first stage's output and a selection."""
        return self.run_stage(1, images, stage1, selection).logits

    # -- public entry points ----------------------------------------------------

    def forward(self, images: Tensor) -> PipelineOutput:
        """Every sample through every stage (training; no exits)."""
        images = self._check_images(images, check_finite=not self.training)
        if images.shape[0] == 0:
            return self._empty_output(images)
        outputs: list[StageOutput] = []
        for index in range(self.num_stages):
            outputs.append(self.run_stage(index, images, outputs[-1] if outputs else None))
        return PipelineOutput(stages=tuple(outputs))

    def _empty_output(self, images: Tensor) -> PipelineOutput:
        empty = images.new_zeros(0, self.backbone.num_classes)
        return PipelineOutput(
            stages=tuple(
                StageOutput(
                    logits=empty,
                    tokens=images.new_zeros(0, self.stage_length(i), self.backbone_of(i).embed_dim),
                    class_attention={},
                    grid=self.grids[i],
                    selection=self._empty_selection(i, images.device) if self.stages[i].refines else None,
                )
                for i in range(self.num_stages)
            )
        )

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

    def set_training_progress(self, epochs: float) -> None:
        """Tell every stage plugin with a schedule how far training has come, in epochs (the trainer calls this
        before each batch; EViT's keep-rate shrink reads it)."""
        for module in self.modules():
            if module is not self and hasattr(module, "set_training_progress"):
                module.set_training_progress(epochs)

    def thresholds(self, threshold: float | Sequence[float] | None) -> list[float | None]:
        """One threshold per exit (None: the exit policy's own); a single number serves every exit."""
        exits = self.num_stages - 1
        if threshold is None or isinstance(threshold, (int, float)):
            return [threshold] * exits
        values = list(threshold)
        if len(values) != exits:
            raise ValueError(f"this pipeline has {exits} exits; give {exits} thresholds, got {len(values)}")
        return values

    @torch.no_grad()
    def infer(self, images: Tensor, threshold: float | Sequence[float] | None = None) -> InferenceResult:
        """Early-exit inference; ``threshold`` overrides the exit policies' own (one number, or one per exit).

        Each stage runs once on the sub-batch of samples that have not
        exited, compacted with one ``nonzero`` per stage.
        """
        images = self._check_images(images, check_finite=True)
        if images.shape[0] == 0:
            empty = images.new_zeros(0, self.backbone.num_classes)
            return InferenceResult(empty, torch.zeros(0, dtype=torch.long, device=images.device), empty)
        cascade = self.__dict__.get("_cascade")
        if cascade is not None:
            return cascade.infer(images, threshold, checked=True)
        thresholds = self.thresholds(threshold)
        out = self.run_stage(0, images)
        first_logits, logits = out.logits, out.logits.clone()
        exit_stage = torch.full((images.shape[0],), self.num_stages, dtype=torch.long, device=images.device)
        active: Tensor | None = None  # batch indices of the samples still running; None: all
        selection = None
        for index in range(1, self.num_stages):
            exits = self.stages[index - 1].exit_policy(out.logits, thresholds[index - 1])
            if active is None:
                exit_stage = torch.where(exits, index, exit_stage)
            else:
                exit_stage[active] = torch.where(exits, index, self.num_stages)
            # select for the whole sub-batch before the host waits on the exit decision: the GPU keeps busy
            refines = self.stages[index].refines
            chosen = self.select(out, index) if refines else None
            remaining = torch.nonzero(~exits).squeeze(1)
            if remaining.numel() == 0:
                selection = None if refines else selection
                break
            active = remaining if active is None else active[remaining]
            if refines:
                chosen = chosen.take(remaining)
                selection = chosen
            # the selection is made: the next stage reads the previous one's tokens and records, not its rows
            previous = out.take(remaining, with_attention=False)
            out = self.run_stage(index, images[active], previous, chosen)
            logits[active] = out.logits.to(logits.dtype)
        return InferenceResult(logits=logits, exit_stage=exit_stage, stage1_logits=first_logits, selection=selection)

    def compute_loss(self, output: PipelineOutput, target: Tensor) -> Tensor:
        if self.loss is None:
            raise RuntimeError("this pipeline was built without a loss; give the recipe a 'loss' section")
        return self.loss(output, target)


def _upgrade_loaded_keys(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    upgraded = upgrade_state_dict_keys(state_dict, prefix)
    state_dict.clear()
    state_dict.update(upgraded)


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
    sections = stage_sections(model)

    def build(kind: str, key: str, section: DictConfig | dict, **context: object) -> nn.Module:
        config = section if isinstance(section, dict) else OmegaConf.to_container(section, resolve=True)
        with _naming(f"{key} ({config.get('type')})"):
            try:
                return registry(kind).build(config, **context)
            except TypeError as exc:  # a constructor refusing an argument's type
                raise ValueError(str(exc)) from None

    # each stage's input side, so every backbone gets a position table per grid it serves
    downsamplers = [
        build("downsampler", *s.plugins["downsampler"]) if "downsampler" in s.plugins else None for s in sections
    ]
    sides = [image_size if d is None else d.output_size(image_size) for d in downsamplers]
    shared_sides = tuple(dict.fromkeys(side for side, s in zip(sides, sections) if "backbone" not in s.plugins))
    backbone = build(
        "backbone",
        "model.backbone",
        model.backbone,
        image_size=image_size,
        stage_image_sizes=shared_sides or (image_size,),
    )
    reducer = build("token_reducer", "model.reduction", model.reduction)
    reduced = _reduced_stages(reducer, len(sections))
    stages = []
    for index, (stage, downsampler, side) in enumerate(zip(sections, downsamplers, sides)):
        plugins = stage.plugins
        own = None
        if "backbone" in plugins:
            own = build("backbone", *plugins["backbone"], image_size=image_size, stage_image_sizes=(side,))
        embed_dim = (own or backbone).embed_dim

        def optional(key: str, kind: str, **context: object) -> nn.Module | None:
            return build(kind, *plugins[key], **context) if key in plugins else None  # noqa: B023

        if stage.hooks and index == 0:
            raise RecipeError(f"{stage.hooks[0][0]}: the first stage has no earlier stage for a hook to read")
        previous_backbone = (stages[index - 1].backbone or backbone) if index else None
        hooks = [
            build("encoder_hook", key, hook, backbone=own or backbone, previous_backbone=previous_backbone)
            for key, hook in stage.hooks
        ]
        with _naming(f"model.stages.{index}"):
            stages.append(
                PipelineStage(
                    backbone=own,
                    downsampler=downsampler,
                    selector=optional("selector", "region_selector"),
                    fuser=optional("fuser", "fuser", embed_dim=embed_dim),
                    reuser=optional("reuser", "token_reuser", embed_dim=embed_dim),
                    hooks=hooks,
                    exit_policy=optional("exit", "exit_policy"),
                    reducer=reducer if index in reduced else None,
                )
            )
    loss = build("loss", "loss", recipe.loss) if with_loss else None
    return DynamicPipeline(backbone, stages, loss, image_size)


def _reduced_stages(reducer: TokenReducer, num_stages: int) -> set[int]:
    """The stage indices ``model.reduction.stage`` names (negative from the end), each checked."""
    if reducer.is_noop:
        return set()
    bad = [s for s in reducer.stage if not -num_stages <= s < num_stages]
    if bad:
        raise RecipeError(
            f"model.reduction.stage: {bad[0]} names no stage of this {num_stages}-stage pipeline; "
            f"use 0..{num_stages - 1} (0-based, like model.stages.N) or -1 for the last"
        )
    return {s % num_stages for s in reducer.stage}


def check_buildable(recipe: DictConfig, source: str = "recipe") -> None:
    """Build the recipe's pipeline on the meta device (no memory, no weights read) to find what it refuses.

    This is how ``load_recipe`` refuses a region larger than the stage-1
    grid or a ``first_block`` beyond the depth before any work starts.
    """
    recipe = copy.deepcopy(recipe)
    backbones = [recipe.model.backbone]
    if not isinstance(recipe.model.stages, int):
        backbones += [stage.backbone for stage in recipe.model.stages if stage.get("backbone") is not None]
    for section in backbones:
        if section.get("checkpoint") is not None:
            section.checkpoint = None  # read when the real pipeline is built
    try:
        with torch.device("meta"):
            build_pipeline(recipe, with_loss=True)
    except (RecipeError, PluginError) as exc:
        raise RecipeError(f"{source}: {exc}") from None
