"""``dynvit import-lfvit``: the authors' LF-ViT checkpoint as a dynvit pipeline checkpoint."""

from __future__ import annotations

import argparse
import math

from dynvit.pipeline import build_pipeline
from dynvit.recipe import load_recipe
from dynvit.weights import CheckpointError, import_lfvit, load_pipeline_state

HELP = "convert the authors' LF-ViT checkpoint (.pth) into a dynvit checkpoint (.safetensors) and check it loads"

# bundled recipe that fits each image size of the authors' releases
_RECIPE_FOR_SIZE = {224: "lfvit_deit_s", 288: "lfvit_star_deit_s"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="IN", help="the authors' checkpoint (.pth with a 'model' entry, or bare)")
    parser.add_argument("output", metavar="OUT", help="where to write the dynvit checkpoint (*.safetensors)")
    parser.add_argument(
        "--recipe",
        default="lfvit_deit_s",
        help="recipe whose pipeline must load the result strictly (default: lfvit_deit_s; LF-ViT*: lfvit_star_deit_s)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides for the recipe")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.model.backbone.get("checkpoint"):
        recipe.model.backbone.checkpoint = None  # the imported weights replace any backbone initialisation
    pipe = build_pipeline(recipe, with_loss=False)

    def fits_recipe(state: dict) -> None:
        try:
            load_pipeline_state(pipe, state, args.source, strict=True)
        except CheckpointError as exc:
            size = math.isqrt(state["backbone.model.pos_embed"].shape[1] - 1) * pipe.backbone.patch_size
            suggestion = _RECIPE_FOR_SIZE.get(size)
            hint = f"; a checkpoint for {size}px images fits --recipe {suggestion}" if suggestion != args.recipe else ""
            raise CheckpointError(
                f"nothing was written: the converted weights do not fit recipe {args.recipe!r}: {exc}{hint}"
            ) from None

    summary = import_lfvit(args.source, args.output, check=fits_recipe)
    grids = " and ".join(f"{g}x{g}" for g in summary.grids)
    print(
        f"read {args.source}: LF-ViT with width {summary.embed_dim}, {summary.depth} blocks, "
        f"patch {summary.patch_size}, {summary.num_classes} classes, "
        f"position tables for {grids} grids (image {summary.image_size})"
    )
    print(f"checked: the {args.recipe} pipeline (image {pipe.image_size}) loads it strictly")
    print(f"wrote {summary.weights} ({summary.num_tensors} tensors) and {summary.sidecar}")
    if summary.metadata_keys:
        print(f"  kept the authors' {', '.join(summary.metadata_keys)} in {summary.sidecar.name}")
    print(f"use it with: load_pipeline_weights(build_pipeline(load_recipe({args.recipe!r})), {str(summary.weights)!r})")
    return 0
