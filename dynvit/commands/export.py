"""``dynvit export``: the stage graphs as ONNX, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynvit.commands import add_recipe_arguments
from dynvit.recipe import load_recipe

HELP = "export the stage graphs to ONNX (stage1.onnx, stage2.onnx, manifest.json) and check them with onnxruntime"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--checkpoint", help="pipeline weights (.safetensors/.pth) or a training checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest |onnxruntime - torch| accepted, relative for outputs above 1 (default 1e-4)",
    )
    parser.add_argument("--no-validate", action="store_true", help="skip the onnxruntime check")


def run(args: argparse.Namespace) -> int:
    import torch

    from dynvit.export import export_onnx
    from dynvit.pipeline import build_pipeline
    from dynvit.weights import load_checkpoint_weights

    recipe = load_recipe(args.recipe, args.overrides)
    torch.manual_seed(int(recipe.train.seed))
    pipe = build_pipeline(recipe, with_loss=False).eval()
    if args.checkpoint is None:
        print("WARNING: no --checkpoint given: exporting a RANDOMLY INITIALISED model", file=sys.stderr)
    else:
        load_checkpoint_weights(pipe, args.checkpoint)
    try:
        report = export_onnx(pipe, args.out, validate=not args.no_validate)
    except (ImportError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(report.files)} to {report.directory}")
    if report.max_diff:
        worst = max(report.max_diff, key=report.max_diff.get)
        print(f"onnxruntime vs torch, largest difference: {report.max_diff[worst]:.2e} ({worst}; relative above 1)")
        if report.max_diff[worst] > args.tolerance:
            print(f"error: {worst} differs by more than --tolerance {args.tolerance:g}", file=sys.stderr)
            return 1
    return 0
