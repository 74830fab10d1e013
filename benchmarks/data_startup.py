"""Image-folder start-up and loader throughput: dynvit's ``imagefolder`` source against timm's loader.

Generates an ImageNet-style folder of tiny JPEGs (100,000 by default: 100
classes, 16 x 16 px) in a temporary folder, then measures, side by side in
one process:

1. start-up: from nothing to a training loader (folder scan, data set,
   sampler): dynvit's ``build_dataloader`` against timm's ``ImageDataset``
   + ``create_loader``. Each run starts from an empty scan cache, as a new
   process does; runs alternate between the two (ABBA order);
2. loader throughput: one epoch over the first ``--images`` images through
   the same DeiT training transforms (built once by dynvit and given to both
   loaders), with the same batch size and number of worker processes,
   worker start included; rounds alternate between the two loaders (ABBA). Two
   figures: images per second of wall-clock time, and images per second of
   a worker's CPU time (the workers' user + system time, read when they
   exit), which is what one worker turns out on a core of its own, and
   which other work on a shared machine does not disturb.

Optionally (``--load-dataset``, minutes) also the former start-up through
``datasets.load_dataset("imagefolder")``, first and cached::

    python benchmarks/data_startup.py                      # 100k files, 2 workers (about 3 min on 2 cores)
    python benchmarks/data_startup.py --files 20000 --load-dataset
    python benchmarks/data_startup.py --root /data/imagenet --images 6400   # an existing folder, nothing generated
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset, create_loader

from dynvit.data import imagefolder
from dynvit.data.loading import build_dataloader, build_transform, set_epoch
from dynvit.recipe import load_recipe


def generate(root: Path, files: int, classes: int, size: int) -> float:
    """``root/train/<class>/*.JPEG`` and a tenth as many under ``root/val``; returns the seconds it took."""
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):  # 64 distinct images, written round-robin: generation stays I/O-bound
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
    start = time.perf_counter()
    for split, count in (("train", files), ("val", max(files // 10, classes))):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(c * count // classes, (c + 1) * count // classes):
                (folder / f"{split}_{i:08d}.JPEG").write_bytes(blobs[i % len(blobs)])
    return time.perf_counter() - start


def dynvit_loader(recipe, workers: int, batch: int, images: int | None = None):
    """dynvit's training loader (over the first ``images`` images), from an empty scan cache (a new process)."""
    imagefolder._scan.cache_clear()
    return build_dataloader(recipe, "train", train=True, batch_size=batch, limit=images)


def timm_loader(root: Path, recipe, workers: int, batch: int, transform: Callable, images: int | None = None):
    """timm's loader over the same folder (its first ``images`` images), with the very transform dynvit uses."""
    dataset = ImageDataset(str(root / "train"))
    if images is not None:
        dataset.reader.samples = dataset.reader.samples[:images]
    loader = create_loader(
        dataset,
        input_size=(3, int(recipe.model.image_size), int(recipe.model.image_size)),
        batch_size=batch,
        is_training=True,
        use_prefetcher=False,
        num_workers=workers,
        persistent_workers=False,
        device=torch.device("cpu"),
    )
    dataset.transform = transform
    return loader


def alternating(names: dict, round_: int) -> list[str]:
    """The names in order on even rounds and reversed on odd ones, so neither side always goes first."""
    order = list(names)
    return order if round_ % 2 == 0 else order[::-1]


def timed(build: Callable) -> tuple[float, object]:
    start = time.perf_counter()
    result = build()
    return time.perf_counter() - start, result


def throughput(loader, epoch: int) -> tuple[float, float]:
    """One epoch: images per wall-clock second, and per second of a worker's CPU time."""
    set_epoch(loader, epoch)
    before, start = os.times(), time.perf_counter()
    images = sum(batch[0].shape[0] for batch in loader)  # the workers exit (and are reaped) at the epoch's end
    wall = time.perf_counter() - start
    after = os.times()
    if loader.num_workers:
        cpu = after.children_user - before.children_user + after.children_system - before.children_system
    else:
        cpu = after.user - before.user + after.system - before.system
    return images / wall, images / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000, help="training images to generate (default 100000)")
    parser.add_argument("--classes", type=int, default=100, help="class folders (default 100)")
    parser.add_argument("--size", type=int, default=16, help="generated image side in px (default 16)")
    parser.add_argument("--root", type=Path, help="use this ImageNet-layout folder instead of generating one")
    parser.add_argument("--recipe", default="lfvit_deit_s", help="whose image size and augmentation (default DeiT-S)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for both (default 2)")
    parser.add_argument("--batch", type=int, default=64, help="batch size for both (default 64)")
    parser.add_argument("--images", type=int, default=1280, help="images per throughput round (default 1280)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each measurement (default 3)")
    parser.add_argument("--load-dataset", action="store_true", help="also time datasets.load_dataset (slow)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    scratch = Path(tempfile.mkdtemp(prefix="dynvit-data-bench-"))
    try:
        root = args.root
        if root is None:
            root = scratch / "folder"
            seconds = generate(root, args.files, args.classes, args.size)
            print(f"generated {root}: {args.files} training JPEGs ({args.size}x{args.size} px) in {seconds:.1f} s")
        classes = imagefolder.training_classes(root)
        recipe = load_recipe(
            args.recipe,
            [
                "data.source=imagefolder",
                f"data.path={root}",
                f"data.num_workers={args.workers}",
                f"model.backbone.num_classes={len(classes)}",
                "train.repeated_aug=1",  # timm's loader draws each image once per epoch too
            ],
        )
        transform = build_transform(recipe, train=True)

        startup: dict[str, list[float]] = {"dynvit": [], "timm": []}
        sizes = {}
        builders = {
            "dynvit": lambda: dynvit_loader(recipe, args.workers, args.batch),
            "timm": lambda: timm_loader(root, recipe, args.workers, args.batch, transform),
        }
        for r in range(args.rounds):
            for name in alternating(builders, r):
                seconds, loader = timed(builders[name])
                startup[name].append(seconds)
                sizes[name] = len(loader.dataset)
        if sizes["dynvit"] != sizes["timm"]:
            raise SystemExit(f"the loaders see different folders: {sizes}")
        files = sizes["dynvit"]

        images = args.images // args.batch * args.batch  # whole batches: every image is read
        loaders = {
            "dynvit": dynvit_loader(recipe, args.workers, args.batch, images),
            "timm": timm_loader(root, recipe, args.workers, args.batch, transform, images),
        }
        rates: dict[str, list[tuple[float, float]]] = {"dynvit": [], "timm": []}
        for r in range(args.rounds):
            for name in alternating(loaders, r):
                rates[name].append(throughput(loaders[name], epoch=r))

        hf: dict[str, float] = {}
        if args.load_dataset:
            import datasets

            cache = scratch / "hf-cache"
            hf["load_dataset, first"], _ = timed(
                lambda: datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(cache))
            )
            hf["load_dataset, cached"], _ = timed(
                lambda: datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(cache))
            )

        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print(
            f"\n{now}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch "
            f"{torch.__version__}; {files} training images, {len(classes)} classes; {args.recipe} training "
            f"transforms at {recipe.model.image_size} px, batch {args.batch}, {args.workers} worker(s); "
            f"medians of {args.rounds} alternating rounds"
        )
        print("\nstart-up (folder scan to a training loader):")
        base = statistics.median(startup["timm"])
        for name, values in startup.items():
            median = statistics.median(values)
            print(
                f"  {name:<24} {median:8.3f} s  {median / files * 1e3:.4f} ms/file  {median / base:5.2f}x timm's"
                f"  (runs: {', '.join(f'{v:.3f}' for v in values)})"
            )
        read = files + len(imagefolder.scan_folder(imagefolder.split_folder(root, "validation")).paths)
        for name, seconds in hf.items():  # it reads train/ and val/
            print(
                f"  {name:<24} {seconds:8.3f} s  {seconds / read * 1e3:.4f} ms/file  {seconds / base:5.2f}x timm's"
                f"  ({read} files: train/ and val/)"
            )
        print(f"\nloader throughput (an epoch of {images} images through the training transforms, workers started):")
        base_wall = statistics.median(wall for wall, _ in rates["timm"])
        base_cpu = statistics.median(cpu for _, cpu in rates["timm"])
        for name, values in rates.items():
            wall, cpu = statistics.median(w for w, _ in values), statistics.median(c for _, c in values)
            print(
                f"  {name:<8} {wall:7.1f} img/s ({wall / base_wall:4.2f}x timm's)   per worker: {cpu:7.1f} img/s of "
                f"CPU time ({cpu / base_cpu:4.2f}x timm's)   (rounds, wall/CPU: "
                f"{', '.join(f'{w:.0f}/{c:.0f}' for w, c in values)})"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
