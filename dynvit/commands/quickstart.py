"""``dynvit quickstart``: LF-ViT trained and evaluated end to end on the embedded data set.

Builds the data, trains the full-resolution baseline
(``recipes/quickstart_baseline.yaml``), then the small LF-ViT of
``recipes/quickstart.yaml`` starting from the baseline's backbone, and
evaluates both on the test split: the exit threshold is calibrated on half
of the test images to reach the baseline's top-1 on those images, and both
models are reported on the other half.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

HELP = "train and evaluate a small LF-ViT on the embedded data set (CPU, minutes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="training epochs of both runs (default: each recipe's)"
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop each training run after N steps (smoke tests)"
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for both recipes")


def _say(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)


def run_quickstart(
    out: str | Path = "runs/quickstart",
    epochs: int | None = None,
    max_steps: int | None = None,
    limit: int | None = None,
    device: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train LF-ViT and its baseline, evaluate both; returns LF-ViT's metrics (baseline included)."""
    from dynvit.data.quickstart import load_quickstart
    from dynvit.evaluation import evaluate
    from dynvit.recipe import load_recipe
    from dynvit.training import train

    out = Path(out)
    common = list(overrides or [])
    if epochs is not None:
        common.append(f"train.epochs={epochs}")
    started = time.perf_counter()

    _say("building the embedded data set (cached after the first run)")
    data = load_quickstart()
    sizes = ", ".join(f"{name} {len(split)}" for name, split in data.items())
    _say(f"data: {sizes} images of 64x64, a small digit among clutter ({time.perf_counter() - started:.0f} s)")

    # the baseline first: LF-ViT starts from its backbone (train.init_backbone)
    runs = {}
    for name, recipe_name, extra in (
        ("baseline", "quickstart_baseline", []),
        ("lfvit", "quickstart", [f"train.init_backbone={out / 'baseline'}"]),
    ):
        recipe = load_recipe(recipe_name, [*common, *extra, f"train.output_dir={out / name}"])
        _say(f"training {recipe_name} ({recipe.train.epochs} epochs) -> {out / name}")
        runs[name] = (recipe_name, train(recipe, max_steps=max_steps))

    eval_overrides = [*common, "eval.split=test"]
    baseline_name, baseline_dir = runs["baseline"]
    lfvit_name, lfvit_dir = runs["lfvit"]
    _say("evaluating the baseline and LF-ViT on the test split; LF-ViT's exit threshold is calibrated on half")
    _say("the images to reach the baseline's top-1 there, and reported on the other half")
    metrics = evaluate(
        lfvit_name,
        str(lfvit_dir),
        out / "eval",
        baseline_recipe=baseline_name,
        baseline_checkpoint=str(baseline_dir),
        target_acc="baseline",
        device=device,
        limit=limit,
        overrides=eval_overrides,
        baseline_overrides=eval_overrides,
        progress=False,
    )
    print(summary(metrics, out, time.perf_counter() - started), flush=True)
    return metrics


def summary(metrics: dict[str, Any], out: Path, seconds: float) -> str:
    """What the quickstart shows, in a few lines a person reads."""
    stages = metrics["stages"]
    baseline = metrics["baseline"]
    calibration = metrics["calibration"] or {}
    held = calibration.get("heldout") or {}
    lines = [
        "",
        "== dynvit quickstart: LF-ViT vs its full-resolution baseline (test split) ==",
        "GFLOPs per image, fvcore convention (1 multiply-add = 1 FLOP); all test images:",
        f"  stage 1 alone (half resolution)      top-1 {stages[0]['top1']:6.1%}   {stages[0]['gflops']:.4f} GFLOPs",
        f"  stage 2 for every image (focus)      top-1 {stages[1]['top1']:6.1%}   {stages[1]['gflops']:.4f} GFLOPs",
        f"  baseline, full resolution            top-1 {baseline['top1']:6.1%}   {baseline['gflops']:.4f} GFLOPs",
    ]
    if held:
        share = held["gflops"] / baseline["gflops"] if baseline["gflops"] else float("nan")
        verdict = "reaches" if calibration.get("feasible") else "cannot reach"
        on_same = calibration.get("baseline_top1") or {}
        lines += [
            f"held-out half ({held['count']} test images the threshold was not chosen on):",
            f"  baseline, full resolution            top-1 {on_same.get('heldout', float('nan')):6.1%}   "
            f"{baseline['gflops']:.4f} GFLOPs",
            f"  LF-ViT at calibrated eta={calibration['eta']:.2f}         top-1 {held['top1']:6.1%}   "
            f"{held['gflops']:.4f} GFLOPs = {share:.0%} of the baseline's; {held['exit_fraction']:.0%} exit at stage 1",
            f"  (eta chosen on the other {calibration['calibration']['count']} images to reach the baseline's "
            f"{on_same.get('calibration', float('nan')):.1%} there; the dynamic model {verdict} it)",
        ]
    throughput = metrics.get("throughput")
    if throughput:
        lines.append(
            f"  measured throughput at that eta: {throughput['dynamic']['images_per_second']:.0f} img/s vs "
            f"{throughput['full_resolution']['images_per_second']:.0f} img/s for the backbone "
            f"({throughput['speedup']:.2f}x, {throughput['device']}, batch {throughput['batch_size']})"
        )
    files = metrics.get("files", {})
    lines += [
        f"plots: {out / 'eval' / (files.get('curve') or 'curve.png')} (accuracy vs GFLOPs), "
        f"{out / 'eval' / (files.get('regions') or 'regions.png')} (selected regions)",
        f"metrics: {out / 'eval' / 'metrics.json'}; checkpoints: {out / 'lfvit'}, {out / 'baseline'}",
        f"total time {seconds / 60:.1f} min",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    run_quickstart(args.out, args.epochs, args.max_steps, args.limit, args.device, list(args.overrides))
    return 0
