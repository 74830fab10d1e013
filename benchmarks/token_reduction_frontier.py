"""What token reduction buys on top of LF-ViT, on the embedded data set, under one training budget.

Trains the quickstart's full-resolution baseline once, then, each from that
baseline's weights and with the quickstart LF-ViT's schedule (same epochs,
seed and learning rate):

* ``lfvit``: the quickstart LF-ViT alone;
* ``lfvit+evit``, ``lfvit+tome``: LF-ViT with EViT or ToMe in stage 2, fine-tuned;
* ``baseline+evit``, ``baseline+tome``: the plain full-resolution ViT with EViT or ToMe, fine-tuned.

ToMe also runs training-free, on the trained LF-ViT and on the baseline,
at several merge counts. Every model is evaluated on the test split: the
dynamic ones over their exit-threshold sweep (a curve) and calibrated on
half the test images to reach the baseline's top-1, reported on the other
half; the one-stage ones at their single cost. One picture
(``frontier.png``) and one table answer: does a combination reach
LF-ViT's held-out top-1 at <= 85% of its GFLOPs? Finished runs are reused,
so an interrupted comparison goes on where it stopped::

    python benchmarks/token_reduction_frontier.py                      # about 12 min on 2 CPU cores
    python benchmarks/token_reduction_frontier.py --out runs/frontier --tome-r 1 2 3
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# fine-tuned variants: name -> (recipe, overrides); the reducer acts in the refining stage of LF-ViT
EVIT = ["model.reduction.type=evit", "model.reduction.keep_rate=0.7"]
TOME = ["model.reduction.type=tome"]
TRAINED: dict[str, tuple[str, list[str]]] = {
    "lfvit": ("quickstart", []),
    "lfvit+evit": ("quickstart", [*EVIT, "model.reduction.stage=1"]),
    "lfvit+tome": ("quickstart", [*TOME, "model.reduction.stage=1", "model.reduction.r=2"]),
    "baseline+evit": ("quickstart_baseline", EVIT),
    "baseline+tome": ("quickstart_baseline", [*TOME, "model.reduction.r=4"]),
}
EVAL = ["eval.split=test", "eval.throughput=false", "eval.region_images=0"]
SHARE_TO_BEAT = 0.85  # of LF-ViT's held-out GFLOPs


@dataclass
class Result:
    """One evaluated model: its held-out point (dynamic) or single point (one-stage), and its curve."""

    name: str
    trained: bool
    top1: float  # held-out top-1 at the calibrated threshold; all test images for a one-stage model
    gflops: float
    exit_fraction: float | None = None
    curve: list[tuple[float, float]] = field(default_factory=list)  # (GFLOPs, top-1) over the threshold sweep


def _point(metrics: dict[str, Any], name: str, trained: bool) -> Result:
    calibration = metrics.get("calibration") or {}
    held = calibration.get("heldout")
    if held is None:  # one stage: its own cost and accuracy
        stage = metrics["stages"][0]
        return Result(name, trained, stage["top1"], stage["gflops"])
    curve = metrics["curve"]
    return Result(
        name,
        trained,
        held["top1"],
        held["gflops"],
        held["exit_fraction"],
        list(zip(curve["gflops"], curve["top1"])),
    )


def run_frontier(
    out: str | Path,
    tome_r: tuple[int, ...] = (1, 2, 3),
    variants: tuple[str, ...] = tuple(TRAINED),
    epochs: int | None = None,
    limit: int | None = None,
    max_steps: int | None = None,
    overrides: list[str] | None = None,
) -> tuple[dict[str, Any], list[Result]]:
    """Train what is missing, evaluate everything; returns the baseline's metrics and one result per model.

    ``epochs``: every variant's training length (default: the quickstart LF-ViT's); the baseline keeps its own.
    """
    from dynvit.evaluation import evaluate
    from dynvit.recipe import load_recipe
    from dynvit.training import train

    out = Path(out)
    common = list(overrides or [])
    lfvit_schedule = load_recipe("quickstart", common).train
    base_recipe = load_recipe("quickstart_baseline", [*common, f"train.output_dir={out / 'baseline'}"])
    print(f"== baseline: {base_recipe.train.epochs} epochs -> {out / 'baseline'}", flush=True)
    baseline_dir = train(base_recipe, resume="auto", max_steps=max_steps)
    # every variant: the LF-ViT's schedule, from the baseline's weights
    schedule = [
        f"train.init_backbone={baseline_dir}",
        f"train.epochs={epochs or lfvit_schedule.epochs}",
        f"train.lr={lfvit_schedule.lr}",
        f"train.warmup_epochs={lfvit_schedule.warmup_epochs}",
    ]
    baseline = evaluate(
        "quickstart_baseline",
        str(baseline_dir),
        out / "eval_baseline",
        limit=limit,
        overrides=[*common, *EVAL],
        progress=False,
    )["stages"][0]
    target = baseline["top1"]

    def evaluated(name: str, recipe: str, checkpoint: Path, extra: list[str], trained: bool) -> Result:
        dynamic = recipe != "quickstart_baseline"
        metrics = evaluate(
            recipe,
            str(checkpoint),
            out / f"eval_{name}",
            target_acc=target if dynamic else None,
            limit=limit,
            overrides=[*common, *extra, *EVAL],
            progress=False,
        )
        result = _point(metrics, name, trained)
        print(f"   {name}: top-1 {result.top1:.1%} at {result.gflops:.4f} GFLOPs", flush=True)
        return result

    results, checkpoints = [], {}
    for name in variants:
        recipe, extra = TRAINED[name]
        folder = out / name.replace("+", "_")
        config = load_recipe(recipe, [*common, *schedule, *extra, f"train.output_dir={folder}"])
        print(f"== {name}: training {config.train.epochs} epochs -> {folder}", flush=True)
        checkpoints[name] = train(config, resume="auto", max_steps=max_steps)
        results.append(evaluated(name, recipe, checkpoints[name], extra, trained=True))
    # training-free ToMe at several merge counts, on the trained LF-ViT and on the baseline
    for r in tome_r:
        for name, recipe, checkpoint, stage in (
            (f"lfvit+tome r={r} (no training)", "quickstart", checkpoints.get("lfvit"), 1),
            (f"baseline+tome r={r} (no training)", "quickstart_baseline", baseline_dir, -1),
        ):
            if checkpoint is None:
                continue
            extra = ["model.reduction.type=tome", f"model.reduction.r={r}", f"model.reduction.stage={stage}"]
            results.append(evaluated(name, recipe, checkpoint, extra, trained=False))
    return baseline, results


def gflops_to_reach(result: Result, top1: float) -> float | None:
    """The least GFLOPs at which a curve (over all test images) reaches ``top1``; None if it never does."""
    points = result.curve or [(result.gflops, result.top1)]
    costs = [g for g, a in points if a >= top1]
    return min(costs) if costs else None


def table(baseline: dict[str, Any], results: list[Result]) -> str:
    lfvit = next((r for r in results if r.name == "lfvit"), None)
    lines = [
        f"baseline (full resolution): top-1 {baseline['top1']:.1%} at {baseline['gflops']:.4f} GFLOPs",
        "held-out: calibrated on half the test images to reach the baseline's top-1, reported on the other half;",
        "one-stage rows: all test images. 'to reach LF-ViT' reads the threshold sweep over all test images.",
        "",
        f"{'model':<34}{'top-1':>8}{'GFLOPs':>9}{'% base':>8}{'% LF-ViT':>10}{'to reach LF-ViT':>17}",
    ]
    for r in results:
        share = f"{r.gflops / lfvit.gflops:.0%}" if lfvit else "-"
        reach = gflops_to_reach(r, lfvit.top1) if lfvit else None
        reach_text = "never" if reach is None else f"{reach:.4f} ({reach / lfvit.gflops:.0%})"
        of_base = r.gflops / baseline["gflops"]
        lines.append(f"{r.name:<34}{r.top1:>8.1%}{r.gflops:>9.4f}{of_base:>8.0%}{share:>10}{reach_text:>17}")
    if lfvit:
        winners = [
            r.name
            for r in results
            if r is not lfvit and r.top1 >= lfvit.top1 and r.gflops <= SHARE_TO_BEAT * lfvit.gflops
        ]
        verdict = ", ".join(winners) if winners else "none"
        lines += ["", f"held-out top-1 >= LF-ViT's {lfvit.top1:.1%} at <= {SHARE_TO_BEAT:.0%} of its GFLOPs: {verdict}"]
    return "\n".join(lines)


def plot(baseline: dict[str, Any], results: list[Result], path: Path) -> None:
    from dynvit.evaluation.plots import CURVE_SIZE, DPI, _save_curve, plt

    fig, ax = plt.subplots(figsize=CURVE_SIZE, dpi=DPI)
    try:
        for r in results:
            if r.curve:
                gflops, top1 = zip(*sorted(r.curve))
                line = ax.plot(gflops, [a * 100 for a in top1], "-", lw=1.2, label=f"{r.name} (threshold sweep)")
                ax.plot(r.gflops, r.top1 * 100, "*", ms=11, color=line[0].get_color())
            else:
                ax.plot(r.gflops, r.top1 * 100, "o" if r.trained else "^", ms=6, label=r.name)
        ax.plot(baseline["gflops"], baseline["top1"] * 100, "s", color="black", ms=7, label="baseline")
        _save_curve(fig, ax, "Token reduction on the quickstart data (test split; stars: held-out calibrated)", path)
    finally:
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/token_reduction_frontier", help="output folder")
    parser.add_argument("--variants", nargs="+", default=list(TRAINED), choices=list(TRAINED), help="models to train")
    parser.add_argument("--tome-r", nargs="*", type=int, default=[1, 2, 3], help="training-free ToMe merge counts")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every variant (default: quickstart's)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each training after N steps (smoke runs)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    baseline, results = run_frontier(
        out, tuple(args.tome_r), tuple(args.variants), args.epochs, args.limit, args.max_steps, args.overrides
    )
    plot(baseline, results, out / "frontier.png")
    (out / "frontier.json").write_text(
        json.dumps({"baseline": baseline, "results": [asdict(r) for r in results]}, indent=1)
    )
    print("\n" + table(baseline, results), flush=True)
    print(f"\npicture: {out / 'frontier.png'}; numbers: {out / 'frontier.json'}", flush=True)


if __name__ == "__main__":
    main()
