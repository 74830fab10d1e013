"""``dynvit flops``: GFLOPs of each stage of a recipe's pipeline, counted by running it."""

from __future__ import annotations

import argparse
import sys

import torch

from dynvit.commands import add_recipe_arguments
from dynvit.flops import CONVENTION, count_flops
from dynvit.pipeline import DynamicPipeline, build_pipeline
from dynvit.recipe import load_recipe

HELP = "count the GFLOPs (fvcore convention) of every stage and the expected cost at given exit fractions"

TWO_STAGE_FRACTIONS = ("0.3", "0.5", "0.7")


def _scenario(text: str) -> tuple[float, ...]:
    """One scenario: the fraction of all images stopping at each exit, comma-separated (``0.5`` or ``0.4,0.3``)."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument(
        "--exit-fractions",
        nargs="+",
        type=_scenario,
        default=None,
        metavar="F",
        help="scenarios, each the fraction of all images that stop at each exit: one number for two stages "
        "(default: 0.3 0.5 0.7), comma-separated per exit for more (e.g. 0.4,0.3; default: 1/N at every exit)",
    )
    parser.add_argument("--batch", type=int, default=1, help="images per counted forward (default: 1)")


def _stage_label(pipe: DynamicPipeline, index: int) -> str:
    stage, (rows, cols) = pipe.stages[index], pipe.grids[index]
    if stage.refines:
        parts = ["selection", *(["fusion"] if stage.fuser is not None else []), *(["reuse"] if stage.reuser else [])]
        return f"stage {index + 1} ({rows}x{cols} grid: {', '.join(parts)})"
    side = pipe.image_size if stage.downsampler is None else stage.downsampler.output_size(pipe.image_size)
    own = ", own backbone" if stage.backbone is not None else ""
    return f"stage {index + 1} ({side}px, {rows}x{cols} grid{own})"


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    scenarios = args.exit_fractions
    bad = [f for s in scenarios or () for f in s if not 0.0 <= f <= 1.0]
    if bad:
        print(f"error: exit fractions must be in [0, 1], got {bad}", file=sys.stderr)
        return 2
    if recipe.model.backbone.get("checkpoint"):
        recipe.model.backbone.checkpoint = None  # weights do not change the count; no file needed
    if not isinstance(recipe.model.stages, int):
        for stage in recipe.model.stages:
            if stage.get("backbone") is not None and stage.backbone.get("checkpoint"):
                stage.backbone.checkpoint = None
    pipe = build_pipeline(recipe, with_loss=False)
    exits = pipe.num_stages - 1
    if scenarios is None:
        scenarios = [(float(f),) for f in TWO_STAGE_FRACTIONS] if exits == 1 else [(1 / pipe.num_stages,) * exits]
    if exits >= 1:
        wrong = [s for s in scenarios if len(s) != exits or sum(s) > 1 + 1e-9]
        if wrong:
            print(
                f"error: this pipeline has {exits} exits: give each scenario as {exits} comma-separated fractions "
                f"of all images adding up to at most 1, got {','.join(map(str, wrong[0]))}",
                file=sys.stderr,
            )
            return 2
    report = count_flops(pipe, batch=args.batch)

    name = " ".join([args.recipe, *args.overrides])
    size = pipe.image_size
    rows: list[tuple[str, str]] = []
    if pipe.num_stages > 1:
        for index in range(pipe.num_stages):
            rows.append((_stage_label(pipe, index), f"{report.stages[index]:.3f}"))
    reduced = [i for i in range(pipe.num_stages) if pipe.stages[i].reducer is not None]
    if pipe.num_stages == 1 and reduced:
        reducer = type(pipe.stages[0].reducer).__name__
        rows.append((f"this model ({reducer} token reduction)", f"{report.stages[0]:.3f}"))
    rows.append((f"full-resolution backbone ({size}px)", f"{report.full_resolution:.3f}"))
    if pipe.num_stages == 1:
        rows.append(("tokens (incl. CLS)", str(report.stage2_length)))
    else:
        rows += [(f"stage-{i + 1} tokens (incl. CLS)", str(n)) for i, n in enumerate(report.lengths)]
    for i in reduced:  # what each block keeps, so the count can be checked by hand
        where = "tokens" if pipe.num_stages == 1 else f"stage-{i + 1} tokens"
        rows.append((f"{where} leaving each block", " ".join(map(str, report.block_lengths[i]))))
    if exits == 1:
        rows += [(f"expected at {s[0]:.0%} exit", f"{report.expected(s[0]):.3f}") for s in scenarios]
    elif exits > 1:
        for s in scenarios:
            shares = ", ".join(f"{f:.0%}" for f in s)
            rows.append((f"expected at exits {shares}", f"{report.expected(s):.3f}"))
    width = max(len(label) for label, _ in rows)
    print(f"{name}: {CONVENTION}, per image; counted with torch FlopCounterMode on {_device(pipe)}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value:>8}")
    return 0


def _device(pipe: torch.nn.Module) -> str:
    return str(next(pipe.parameters()).device)
