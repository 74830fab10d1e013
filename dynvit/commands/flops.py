"""``dynvit flops``: GFLOPs of each stage of a recipe's pipeline, counted by running it."""

from __future__ import annotations

import argparse
import sys

import torch

from dynvit.commands import add_recipe_arguments
from dynvit.flops import CONVENTION, count_flops
from dynvit.pipeline import build_pipeline
from dynvit.recipe import load_recipe

HELP = "count the GFLOPs (fvcore convention) of stage 1, stage 2 and the expected cost at given exit fractions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument(
        "--exit-fractions",
        nargs="+",
        type=float,
        default=[0.3, 0.5, 0.7],
        metavar="F",
        help="fractions of images that stop after stage 1 (default: 0.3 0.5 0.7)",
    )
    parser.add_argument("--batch", type=int, default=1, help="images per counted forward (default: 1)")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    bad = [f for f in args.exit_fractions if not 0.0 <= f <= 1.0]
    if bad:
        print(f"error: exit fractions must be in [0, 1], got {bad}", file=sys.stderr)
        return 2
    if recipe.model.backbone.get("checkpoint"):
        recipe.model.backbone.checkpoint = None  # weights do not change the count; no file needed
    pipe = build_pipeline(recipe, with_loss=False)
    report = count_flops(pipe, batch=args.batch)

    name = " ".join([args.recipe, *args.overrides])
    size = pipe.image_size
    rows: list[tuple[str, str]] = []
    if pipe.num_stages == 2:
        low = pipe.downsampler.output_size(size)
        g1, g2 = pipe.grid1, pipe.grid2
        rows += [
            (f"stage 1 ({low}px, {g1[0]}x{g1[1]} grid)", f"{report.stage1:.3f}"),
            (f"stage 2 ({g2[0]}x{g2[1]} grid: selection, fusion, reuse)", f"{report.stage2:.3f}"),
        ]
    rows += [
        (f"full-resolution backbone ({size}px)", f"{report.full_resolution:.3f}"),
        ("stage-2 tokens (incl. CLS)" if pipe.num_stages == 2 else "tokens (incl. CLS)", str(report.stage2_length)),
    ]
    if pipe.num_stages == 2:
        rows += [(f"expected at {f:.0%} exit", f"{report.expected(f):.3f}") for f in args.exit_fractions]
    width = max(len(label) for label, _ in rows)
    print(f"{name}: {CONVENTION}, per image; counted with torch FlopCounterMode on {_device(pipe)}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value:>8}")
    return 0


def _device(pipe: torch.nn.Module) -> str:
    return str(next(pipe.parameters()).device)
