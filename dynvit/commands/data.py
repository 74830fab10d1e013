"""``dynvit data``: build data sets shipped with dynvit (``dynvit data quickstart --out DIR``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = "build the embedded quickstart data set"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``quickstart`` and its options under ``dynvit data``."""
    sub = parser.add_subparsers(dest="data_command", metavar="DATASET")
    quick = sub.add_parser(
        "quickstart",
        help=HELP,
        description="Render the quickstart digits-on-photos data set and save it with save_to_disk.",
    )
    quick.add_argument("--out", type=Path, required=True, help="output folder (written with save_to_disk)")
    quick.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    quick.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    quick.add_argument("--num-train", type=int, default=6000, help="training images (default 6000)")
    quick.add_argument("--num-val", type=int, default=1000, help="validation images (default 1000)")
    quick.add_argument("--num-test", type=int, default=2000, help="test images (default 2000)")
    quick.add_argument(
        "--imagefolder",
        action="store_true",
        help="also write the ImageNet folder layout under OUT/imagefolder (train/val/test/<class>/<n>.png)",
    )


def run(args: argparse.Namespace) -> int:
    """Build, save and optionally export; prints what was written. Returns a process exit code."""
    if getattr(args, "data_command", None) != "quickstart":
        print("error: choose a data set: dynvit data quickstart --out DIR", file=sys.stderr)
        return 2
    from dynvit.data.quickstart import build_quickstart, export_imagefolder

    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty; choose a new folder", file=sys.stderr)
        return 2
    try:
        start = time.perf_counter()
        dataset = build_quickstart(
            seed=args.seed,
            image_size=args.image_size,
            num_train=args.num_train,
            num_val=args.num_val,
            num_test=args.num_test,
        )
        built = time.perf_counter() - start
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{split} {len(ds)}" for split, ds in dataset.items())
    print(f"built quickstart (seed {args.seed}, {args.image_size}x{args.image_size} px): {sizes} in {built:.1f} s")

    start = time.perf_counter()
    dataset.save_to_disk(str(out))
    print(f"wrote {out} (save_to_disk) in {time.perf_counter() - start:.1f} s")
    if args.imagefolder:
        start = time.perf_counter()
        folder = export_imagefolder(dataset, out / "imagefolder")
        print(f"wrote {folder} (train/val/test/<class>/<n>.png) in {time.perf_counter() - start:.1f} s")
    return 0
