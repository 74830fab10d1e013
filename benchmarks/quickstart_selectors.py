"""Table 6 on the embedded data set: region selectors trained under one budget.

Trains the quickstart's full-resolution baseline once, then the quickstart
LF-ViT once per selector (NGCA, random, negative NGCA) from that baseline's
backbone, same seed and schedule, and evaluates each on the test split. The
paper's ordering is NGCA > random > negative NGCA in stage-2 top-1. Runs that
finished are reused, so an interrupted comparison picks up where it stopped::

    python benchmarks/quickstart_selectors.py                  # the recipe's epochs, minutes per selector on a CPU
    python benchmarks/quickstart_selectors.py --epochs 4 --out runs/selectors train.full_image_epochs=2
"""

from __future__ import annotations

import argparse
from pathlib import Path

SELECTORS = ("ngca", "random", "negative_ngca")


def run_selectors(
    out: str | Path,
    epochs: int | None = None,
    selectors: tuple[str, ...] = SELECTORS,
    limit: int | None = None,
    max_steps: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, list[float]]:
    """Train and evaluate one LF-ViT per selector; returns ``{selector: [stage-1 top-1, stage-2 top-1]}``.

    ``epochs`` sets the LF-ViT runs' length; the baseline keeps its recipe's.
    """
    from dynvit.evaluation import evaluate
    from dynvit.recipe import load_recipe
    from dynvit.training import train

    out = Path(out)
    common = list(overrides or [])
    baseline = load_recipe("quickstart_baseline", [*common, f"train.output_dir={out / 'baseline'}"])
    print(f"== full-resolution baseline: {baseline.train.epochs} epochs -> {out / 'baseline'}", flush=True)
    baseline_dir = train(baseline, resume="auto", max_steps=max_steps)
    common += [f"train.init_backbone={baseline_dir}", *([f"train.epochs={epochs}"] if epochs is not None else [])]
    results = {}
    for selector in selectors:
        overrides = [*common, f"model.selector.type={selector}"]
        recipe = load_recipe("quickstart", [*overrides, f"train.output_dir={out / selector}"])
        print(f"== {selector}: training {recipe.train.epochs} epochs -> {out / selector}", flush=True)
        run_dir = train(recipe, resume="auto", max_steps=max_steps)
        metrics = evaluate(
            "quickstart",
            str(run_dir),
            out / f"eval_{selector}",
            limit=limit,
            overrides=[*overrides, "eval.split=test", "eval.throughput=false", "eval.region_images=0"],
            progress=False,
        )
        results[selector] = [stage["top1"] for stage in metrics["stages"]]
    return results


def table(results: dict[str, list[float]]) -> str:
    lines = [f"{'selector':<15}{'stage 1 top-1':>15}{'stage 2 top-1':>15}"]
    lines += [f"{name:<15}{acc[0]:>15.1%}{acc[-1]:>15.1%}" for name, acc in results.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart_selectors", help="output folder")
    parser.add_argument("--epochs", type=int, default=None, help="LF-ViT training epochs (default: the recipe's)")
    parser.add_argument("--selectors", nargs="+", default=list(SELECTORS), help="selector plugins to compare")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each training after N steps (smoke runs)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every selector")
    args = parser.parse_args()
    results = run_selectors(args.out, args.epochs, tuple(args.selectors), args.limit, args.max_steps, args.overrides)
    print("\nTable 6 on the quickstart data (test split, same seed and schedule)")
    print(table(results), flush=True)


if __name__ == "__main__":
    main()
