"""An ImageNet-layout folder as a ``datasets.Dataset``, from one directory scan.

``datasets.load_dataset("imagefolder")`` globs, hashes and writes every file
into an Arrow cache: about a millisecond a file, some 25 minutes for
ImageNet's 1.33 M training images before the first step of every run. A
scan with ``os.scandir`` lists the same files at a few microseconds a file
(``benchmarks/data_startup.py``); the split is then an in-memory ``Dataset``
of paths and labels whose ``image`` column is the usual ``datasets.Image``
feature, decoded when a row is read (in the DataLoader workers), so
everything downstream sees the dataset it saw before.

What the scan reproduces of the ``imagefolder`` builder (checked against it
by the tests): the same image extensions, in any case and as the
second-to-last extension too (``x.png.txt`` is read as an image); hidden
(``.x``) and special (``__x``) files and folders skipped; class names sorted
as strings; rows in the order of their sorted paths. Where the builder gives
no labels (a single class, or images at different depths) or wrong ones, the
scan names the problem instead; images in sub-folders of a class folder
belong to that class.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from dynvit.data.errors import DataError

# split name -> the folder names the imagefolder builder maps to it (datasets.data_files.SPLIT_KEYWORDS)
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "validation": ("val", "validation", "valid", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}


def image_extensions() -> frozenset[str]:
    """File extensions the ``imagefolder`` builder reads (lower case; it matches them in any case)."""
    try:
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        names = [e.lower() for e in ImageFolder.EXTENSIONS]
    except (ImportError, AttributeError):
        from PIL import Image

        names = [e.lower() for e in Image.registered_extensions()]
    return frozenset(names)


def _is_image(name: str, extensions: frozenset[str]) -> bool:
    """The builder's test: the last or the second-to-last extension, in any case (``x.JPG``, ``x.png.txt``)."""
    stem, last = os.path.splitext(name)
    return last.lower() in extensions or os.path.splitext(stem)[1].lower() in extensions


def _skipped(name: str) -> bool:
    """Hidden and special entries, which the builder does not read."""
    return name.startswith((".", "__"))


def split_folder(root: Path, split: str) -> Path:
    """The folder of ``split`` under ``root`` (``train/``, ``val/``, ``test/``, ...)."""
    names = SPLIT_FOLDERS.get(split, (split,))
    found = [root / name for name in names if (root / name).is_dir()]
    if len(found) > 1:
        shown = " and ".join(f"{folder}/" for folder in found)
        raise DataError(f"data.path={root} has {shown}, both read as the {split!r} split; keep one of them")
    if not found:
        expected = " or ".join(f"{root / n}/" for n in names)
        raise DataError(
            f"data.path={root} has no folder for the {split!r} split (expected {expected}); "
            "use the ImageNet layout: PATH/train/<class>/*.JPEG and PATH/val/<class>/*.JPEG"
        )
    return found[0]


@dataclass(frozen=True)
class FolderScan:
    """One split folder: its class folders and every image in them, in the builder's row order."""

    folder: Path
    classes: tuple[str, ...]  # class folder names, sorted
    paths: pa.StringArray  # absolute image paths, sorted as strings (Arrow: the characters + 4 bytes a path)
    labels: np.ndarray  # int64: index into ``classes`` of each path's class folder
    loose: tuple[str, ...]  # images directly in the split folder, outside any class folder


def _images_below(folder: str, extensions: frozenset[str]) -> list[str]:
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not _skipped(d)]
        found += [os.path.join(directory, f) for f in files if not _skipped(f) and _is_image(f, extensions)]
    return found


def scan_folder(folder: Path) -> FolderScan:
    """List a split folder's class folders and images.

    A run reads each split several times, so scans are cached, keyed by the
    modification times of the split folder and its class folders: adding or
    removing a class folder or an image directly in one starts a new scan.
    """
    with os.scandir(folder) as entries:
        stamps = tuple(sorted((e.name, e.stat().st_mtime_ns) for e in entries if e.is_dir()))
    return _scan(folder, (os.stat(folder).st_mtime_ns, stamps))


@functools.lru_cache(maxsize=8)
def _scan(folder: Path, stamp: tuple) -> FolderScan:
    extensions = image_extensions()
    classes, loose = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if _skipped(entry.name):
                continue
            if entry.is_dir():
                classes.append(entry.name)
            elif _is_image(entry.name, extensions):
                loose.append(entry.path)
    classes.sort()
    rows = sorted(
        (path, label) for label, name in enumerate(classes) for path in _images_below(str(folder / name), extensions)
    )
    return FolderScan(
        folder=folder,
        classes=tuple(classes),
        paths=pa.array([path for path, _ in rows], pa.string()),
        labels=np.fromiter((label for _, label in rows), dtype=np.int64, count=len(rows)),
        loose=tuple(sorted(loose)),
    )


def _shown(names: list[str] | tuple[str, ...], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_classes(scan: FolderScan, split: str) -> list[str]:
    """The class names a split's folder defines, after checking it can label images at all."""
    folder = scan.folder
    if not scan.classes:
        what = "images but no class folders" if scan.loose else "no images"
        raise DataError(
            f"{folder} ({split!r} split) holds {what}; put each class's images in their own folder: "
            f"{folder}/<class>/<image>"
        )
    if scan.loose:
        names = [os.path.basename(p) for p in scan.loose]
        raise DataError(
            f"{folder} ({split!r} split) holds {len(names)} image(s) outside the class folders ({_shown(names, 3)}); "
            "move them into their class folder or delete them"
        )
    counts = np.bincount(scan.labels, minlength=len(scan.classes))
    empty = [name for name, count in zip(scan.classes, counts) if count == 0]
    if empty:
        shown_extensions = ", ".join(sorted(image_extensions())[:6])
        raise DataError(
            f"{folder}: no images in the class folder(s) {_shown(empty)} (looked for {shown_extensions}...); "
            "add images or remove the empty folders"
        )
    if len(scan.classes) < 2:
        raise DataError(
            f"{folder} ({split!r} split) has a single class folder ({scan.classes[0]}); a classifier needs at least "
            "two classes: add a folder for each class"
        )
    return list(scan.classes)


def folder_split(root: str | Path, split: str, classes: list[str]) -> datasets.Dataset:
    """``split`` of the folder ``root`` as a ``Dataset`` with ``image`` (decoded on access) and ``label`` columns.

    ``classes`` (the training split's class folders) fix the labels, so every
    split shares one ``ClassLabel``.
    """
    scan = scan_folder(split_folder(_absolute(root), split))
    if len(scan.paths) == 0:
        raise DataError(
            f"{scan.folder} ({split!r} split) holds no images; add images to its class folders, "
            "or point the recipe at another split"
        )
    if scan.loose:
        check_classes(scan, split)  # names the loose images
    unknown = sorted({scan.classes[label] for label in np.unique(scan.labels)} - set(classes))
    if unknown:
        raise DataError(
            f"{scan.folder} ({split!r} split) has class folder(s) the training split lacks: {_shown(unknown)}; "
            "every split must use the training split's class folders"
        )
    labels = scan.labels
    if tuple(classes) != scan.classes:  # a split with fewer class folders: the training split's numbering
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index.get(name, -1) for name in scan.classes], dtype=np.int64)[labels]
    image = pa.StructArray.from_arrays([pa.nulls(len(scan.paths), pa.binary()), scan.paths], names=["bytes", "path"])
    table = pa.table({"image": image, "label": pa.array(labels, pa.int64())})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features), split=split)


def training_classes(root: str | Path, split: str = "train") -> list[str]:
    """Class names of the folder ``root``, defined by its ``split`` folder."""
    return check_classes(scan_folder(split_folder(_absolute(root), split)), split)


def _absolute(root: str | Path) -> Path:
    """Rows hold absolute paths, so workers decode them whatever their working directory."""
    return Path(os.path.abspath(root))
