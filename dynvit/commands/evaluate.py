"""``dynvit eval``: per-stage accuracy, the accuracy/FLOPs curve, calibrated exits, pictures and throughput."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynvit.commands import add_recipe_arguments
from dynvit.errors import one_line
from dynvit.recipe import load_recipe

HELP = "evaluate a checkpoint: per-stage accuracy, accuracy/FLOPs curve, calibrated exits, pictures, throughput"

BANNER = "!" * 78


def _target(text: str) -> float | str:
    if text == "baseline":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.8, or 'baseline'; got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, "eval.batch_size=256")
    parser.add_argument("--checkpoint", help="pipeline weights (.safetensors/.pth) or a training checkpoint folder")
    parser.add_argument("--out", type=Path, help="output folder (default: the recipe's eval.output_dir)")
    parser.add_argument("--baseline", metavar="RECIPE", help="a plain model evaluated on the same images (deit_s)")
    parser.add_argument("--baseline-checkpoint", metavar="PATH", help="weights of the baseline")
    parser.add_argument(
        "--baseline-override",
        action="append",
        default=[],
        metavar="key=value",
        help="override in the baseline's recipe (repeatable): --baseline-override model.backbone.num_classes=10",
    )
    goal = parser.add_mutually_exclusive_group()
    goal.add_argument("--budget-gflops", type=float, metavar="G", help="choose eta: best top-1 within G GFLOPs/image")
    goal.add_argument(
        "--target-acc",
        type=_target,
        metavar="A",
        help="choose eta: fewest GFLOPs with top-1 >= A (0-1), or 'baseline': the one-stage baseline's top-1 on "
        "the same calibration images",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate the first N images only")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--compile", action="store_true", help="time the throughput under torch.compile (both models; compiles first)"
    )


def run(args: argparse.Namespace) -> int:
    from dynvit.evaluation import evaluate, format_table

    recipe = load_recipe(args.recipe, args.overrides)
    if (args.baseline_checkpoint or args.baseline_override) and not args.baseline:
        print("error: --baseline-checkpoint and --baseline-override need --baseline RECIPE", file=sys.stderr)
        return 2
    if args.checkpoint is None:
        print(
            f"{BANNER}\nWARNING: no --checkpoint given: evaluating a RANDOMLY INITIALISED model.\n"
            f"The figures below say nothing about a trained model.\n{BANNER}",
            file=sys.stderr,
        )
    try:
        metrics = evaluate(
            recipe,
            args.checkpoint,
            args.out,
            baseline_recipe=args.baseline,
            baseline_checkpoint=args.baseline_checkpoint,
            budget_gflops=args.budget_gflops,
            target_acc=args.target_acc,
            device=args.device,
            limit=args.limit,
            overrides=args.overrides,
            baseline_overrides=args.baseline_override,
            recipe_name=args.recipe,
            progress=not args.no_progress,
            compile=args.compile,
        )
    except (ValueError, FileNotFoundError) as exc:  # the evaluation's own checks raise ValueError
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    out = args.out if args.out is not None else Path(recipe.eval.output_dir)
    written = ", ".join(name for name in metrics["files"].values() if name)
    print(f"wrote {written} to {out}")
    return 0
