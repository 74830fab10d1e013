"""Shared by ``dynvit import-lfvit``, ``import-cfvit`` and ``import-dvt``: an authors' checkpoint as a dynvit one.

Each command module builds one :class:`AuthorsImportCommand` and exports its
``HELP``, ``add_arguments`` and ``run``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from dynvit.pipeline import build_pipeline
from dynvit.recipe import load_recipe
from dynvit.weights import AUTHORS_FORMATS, CheckpointError, import_authors_checkpoint, load_pipeline_state


@dataclass(frozen=True)
class AuthorsImportCommand:
    method: str  # key of dynvit.weights.AUTHORS_FORMATS
    recipe_for_size: dict[int, str]  # bundled recipe that fits each image size of the authors' releases

    @property
    def name(self) -> str:
        return AUTHORS_FORMATS[self.method].name

    @property
    def default_recipe(self) -> str:
        return self.recipe_for_size[min(self.recipe_for_size)]

    @property
    def help(self) -> str:
        return (
            f"convert the authors' {self.name} checkpoint (.pth) into a dynvit checkpoint (.safetensors) "
            "and check it loads"
        )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "source",
            metavar="IN",
            help="the authors' checkpoint (.pth with a 'model' or 'model_state_dict' entry, or bare)",
        )
        parser.add_argument("output", metavar="OUT", help="where to write the dynvit checkpoint (*.safetensors)")
        others = "; ".join(f"{size}px: {name}" for size, name in sorted(self.recipe_for_size.items()))
        parser.add_argument(
            "--recipe",
            default=self.default_recipe,
            help=f"recipe whose pipeline must load the result strictly (default: {self.default_recipe}; {others})",
        )
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides for the recipe")

    def run(self, args: argparse.Namespace) -> int:
        recipe = load_recipe(args.recipe, args.overrides)
        if recipe.model.backbone.get("checkpoint"):
            recipe.model.backbone.checkpoint = None  # the imported weights replace any backbone initialisation
        pipe = build_pipeline(recipe, with_loss=False)

        def fits_recipe(state: dict) -> None:
            try:
                load_pipeline_state(pipe, state, args.source, strict=True)
            except CheckpointError as exc:
                size = math.isqrt(state["backbone.model.pos_embed"].shape[1] - 1) * pipe.backbone.patch_size
                suggestion = self.recipe_for_size.get(size)
                hint = (
                    f"; a checkpoint for {size}px images fits --recipe {suggestion}"
                    if suggestion not in (None, args.recipe)
                    else ""
                )
                raise CheckpointError(
                    f"nothing was written: the converted weights do not fit recipe {args.recipe!r}: {exc}{hint}"
                ) from None

        summary = import_authors_checkpoint(args.source, args.output, self.method, check=fits_recipe)
        grids = " and ".join(f"{g}x{g}" for g in summary.grids)
        print(
            f"read {args.source}: {self.name} with width {summary.embed_dim}, {summary.depth} blocks, "
            f"patch {summary.patch_size}, {summary.num_classes} classes, "
            f"position tables for {grids} grids (image {summary.image_size})"
        )
        print(f"checked: the {args.recipe} pipeline (image {pipe.image_size}) loads it strictly")
        print(f"wrote {summary.weights} ({summary.num_tensors} tensors) and {summary.sidecar}")
        if summary.metadata_keys:
            print(f"  kept the authors' {', '.join(summary.metadata_keys)} in {summary.sidecar.name}")
        print(
            f"use it with: load_pipeline_weights(build_pipeline(load_recipe({args.recipe!r})), "
            f"{str(summary.weights)!r})"
        )
        return 0
