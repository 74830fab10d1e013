"""``dynvit train``: train a recipe; run it under ``accelerate launch`` or ``torchrun`` for several processes."""

from __future__ import annotations

import argparse
from pathlib import Path

from dynvit.commands import add_recipe_arguments

HELP = "train a recipe (one process, or data-parallel under accelerate launch / torchrun)"

DEFAULT_OUTPUT_DIR = "runs/default"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, "train.epochs=1")
    parser.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="continue from a checkpoint folder or a run's output folder; 'auto': this run's last checkpoint if any",
    )
    parser.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimiser steps in all")
    parser.add_argument(
        "--output-dir", metavar="DIR", help="where checkpoints and metrics go (train.output_dir); default runs/RECIPE"
    )


def run(args: argparse.Namespace) -> int:
    from dynvit.recipe import load_recipe
    from dynvit.training.trainer import train

    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"train.output_dir={args.output_dir}")
    recipe = load_recipe(args.recipe, overrides)
    if recipe.train.output_dir == DEFAULT_OUTPUT_DIR and args.output_dir is None:
        recipe.train.output_dir = f"runs/{Path(str(args.recipe)).stem}"
    # errors a user can fix (recipe, data, checkpoints, a full disk) are printed by the command line
    output_dir = train(recipe, resume=args.resume, max_steps=args.max_steps)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"done: checkpoints in {output_dir / 'checkpoints'}, metrics in {output_dir / 'metrics.jsonl'}")
    return 0
