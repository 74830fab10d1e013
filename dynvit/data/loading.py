"""Images for training and evaluation, through Hugging Face ``datasets`` and timm's transforms.

Three sources, named by ``data.source`` in a recipe:

- ``imagefolder``: ``data.path`` in the ImageNet layout, ``train/<class>/*.JPEG``
  and ``val/<class>/*.JPEG``, listed by one directory scan
  (:mod:`dynvit.data.imagefolder`: seconds for ImageNet, nothing cached);
- ``disk``: a ``DatasetDict`` written by ``save_to_disk`` (``load_from_disk``);
- ``quickstart``: the embedded data set of :mod:`dynvit.data.quickstart`.

Decoding and augmentation run in the DataLoader workers. Training shards are
disjoint across ranks and every draw carries its own augmentation seed, so the
images a step sees depend only on ``(train.seed, epoch, position)``: a resumed
run replays them exactly, whatever the number of workers or processes.

An image that cannot be decoded stops the run with a :class:`DataError`
naming the file and the split (also from inside a worker process), unless
``data.skip_corrupt`` is set: then it is replaced by the next readable image
of the split, a warning names it, and :func:`skipped_images` lists them.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from omegaconf import DictConfig
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from dynvit.data.errors import DataError
from dynvit.data.imagefolder import folder_split, training_classes

SOURCES = ("quickstart", "imagefolder", "disk")

__all__ = [
    "DataError",
    "ImageDataset",
    "ShardSampler",
    "build_dataloader",
    "build_transform",
    "check_imagefolder",
    "class_names",
    "load_split",
    "set_epoch",
    "shard_range",
    "skipped_images",
    "validate_data",
]

logger = logging.getLogger(__name__)


# -- sources ---------------------------------------------------------------------


def check_imagefolder(root: str | Path, splits: tuple[str, ...] = ("train", "validation")) -> list[str]:
    """Check an ImageNet-layout folder before anything is built; returns the class names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path={root} does not exist; point data.path at a folder with train/ and val/")
    found = {split: training_classes(root, split) for split in splits}
    reference_split, reference = next(iter(found.items()))
    for split, classes in found.items():
        if classes != reference:
            only_ref = sorted(set(reference) - set(classes))
            only_this = sorted(set(classes) - set(reference))
            details = []
            if only_ref:
                details.append(f"only in {reference_split}: {', '.join(only_ref[:8])}")
            if only_this:
                details.append(f"only in {split}: {', '.join(only_this[:8])}")
            raise DataError(
                f"the class folders of {reference_split} and {split} under {root} differ "
                f"({'; '.join(details)}); both splits need the same class folders, or labels would not match"
            )
    return reference


@functools.lru_cache(maxsize=4)
def _load_source(source: str, path: str | None, cache_dir: str | None) -> tuple[datasets.DatasetDict, frozenset[str]]:
    """The data set and the names of its splits saved with no rows (which ``load_from_disk`` cannot load)."""
    if source == "quickstart":
        from dynvit.data.quickstart import load_quickstart

        return load_quickstart(cache_dir=cache_dir), frozenset()
    if path is None:
        raise DataError(f"data.source={source} needs data.path")
    if source == "disk":
        if not Path(path).is_dir():
            raise DataError(f"data.path={path} does not exist; give the folder written by DatasetDict.save_to_disk")
        empty = _empty_saved_splits(Path(path))
        if empty:
            splits = json.loads((Path(path) / "dataset_dict.json").read_text())["splits"]
            loaded = {split: datasets.load_from_disk(str(Path(path) / split)) for split in splits if split not in empty}
            return datasets.DatasetDict(loaded), frozenset(empty)
        loaded = datasets.load_from_disk(path)
        if not isinstance(loaded, datasets.DatasetDict):
            raise DataError(
                f"{path} holds a single Dataset; save a DatasetDict with train and validation splits "
                "(DatasetDict({'train': ..., 'validation': ...}).save_to_disk(path))"
            )
        return loaded, frozenset()
    raise DataError(f"data.source={source!r} is not one of {', '.join(SOURCES)}")


def _empty_saved_splits(root: Path) -> set[str]:
    """Splits of a saved ``DatasetDict`` written with no data files: 0 rows."""
    try:
        splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
        states = {split: json.loads((root / split / "state.json").read_text()) for split in splits}
    except (OSError, ValueError, KeyError, TypeError):
        return set()  # not a DatasetDict folder; load_from_disk says what it is
    return {split for split, state in states.items() if not state.get("_data_files")}


def load_split(recipe: DictConfig, split: str) -> datasets.Dataset:
    """One split of the recipe's data set, with only the image and label columns.

    ``imagefolder`` data is scanned, not converted: the split is an in-memory
    ``Dataset`` of paths whose images decode when a row is read.
    """
    data = recipe.data
    if data.source == "imagefolder":
        if data.path is None:
            raise DataError("data.source=imagefolder needs data.path: a folder with train/ and val/ class folders")
        if not Path(data.path).is_dir():
            raise DataError(f"data.path={data.path} does not exist; point data.path at a folder with train/ and val/")
        classes = training_classes(data.path, data.train_split)
        return folder_split(data.path, split, classes)
    dsd, empty = _load_source(str(data.source), data.path, data.cache_dir)
    where = f" at {data.path}" if data.path is not None else ""
    if split in empty:
        raise DataError(
            f"the {split!r} split of the {data.source} data set{where} has no images (0 rows); "
            "save it again with images in it, or point the recipe at another split"
        )
    if split not in dsd:
        raise DataError(
            f"the {data.source} data set has no split {split!r}; its splits are {', '.join([*dsd, *sorted(empty)])}"
        )
    ds = dsd[split]
    missing = [c for c in (data.image_column, data.label_column) if c not in ds.column_names]
    if missing:
        raise DataError(
            f"split {split!r} has no column(s) {', '.join(missing)} (columns: {', '.join(ds.column_names)}); "
            "set data.image_column / data.label_column"
        )
    if len(ds) == 0:
        raise DataError(
            f"the {split!r} split of the {data.source} data set{where} has no images (0 rows); "
            "save it again with images in it, or point the recipe at another split"
        )
    return ds.select_columns([data.image_column, data.label_column])


def _label_names(ds: datasets.Dataset, column: str) -> list[str] | None:
    feature = ds.features[column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def class_names(recipe: DictConfig) -> list[str]:
    """Class names in label order."""
    data = recipe.data
    if data.source == "imagefolder" and data.path is not None:
        return check_imagefolder(data.path, (data.train_split,))
    ds = load_split(recipe, data.train_split)
    names = _label_names(ds, data.label_column)
    if names is None:
        return [str(i) for i in range(int(max(ds[data.label_column])) + 1)]
    return names


def validate_data(recipe: DictConfig) -> list[str]:
    """Check the recipe's data before training; returns the class names.

    Catches an empty folder or split, a single class, train/val class lists
    that differ and a class count the model's head does not have. Images are
    not decoded here (that would be a pass over the whole data set): an
    unreadable one is found when a worker reads it.
    """
    data = recipe.data
    if data.source not in SOURCES:
        raise DataError(f"data.source={data.source!r} is not one of {', '.join(SOURCES)}")
    splits = (data.train_split, data.val_split)
    if data.source == "imagefolder":
        if data.path is None:
            raise DataError("data.source=imagefolder needs data.path: a folder with train/ and val/ class folders")
        names = check_imagefolder(data.path, splits)
    else:
        loaded = [load_split(recipe, split) for split in splits]  # an empty split raises here
        names_per_split = [_label_names(ds, data.label_column) for ds in loaded]
        if names_per_split[0] != names_per_split[1]:
            raise DataError(
                f"the class lists of {splits[0]!r} and {splits[1]!r} differ ({names_per_split[0]} vs "
                f"{names_per_split[1]}); both splits must use the same ClassLabel feature"
            )
        names = class_names(recipe)
        if len(names) < 2:
            raise DataError(
                f"the {data.source} data set has a single class ({', '.join(names)}); a classifier needs at least "
                "two classes: add images of the other classes"
            )
    num_classes = recipe.model.backbone.get("num_classes")
    if num_classes is not None and int(num_classes) != len(names):
        raise DataError(
            f"the data has {len(names)} classes but model.backbone.num_classes={num_classes}; "
            f"set model.backbone.num_classes={len(names)}"
        )
    return names


# -- transforms ---------------------------------------------------------------------


def normalisation(recipe: DictConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the loaders normalise with."""
    return tuple(recipe.data.mean), tuple(recipe.data.std)


def build_transform(recipe: DictConfig, train: bool) -> Callable:
    """timm's transforms: DeiT's augmentation for training, resize + centre crop for evaluation."""
    data, size = recipe.data, int(recipe.model.image_size)
    mean, std = normalisation(recipe)
    if not train:
        return create_transform(
            size, is_training=False, interpolation=data.interpolation, crop_pct=data.crop_pct, mean=mean, std=std
        )
    cfg = recipe.train
    transform = create_transform(
        size,
        is_training=True,
        scale=tuple(cfg.scale),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa or None,
        interpolation=data.interpolation,
        mean=mean,
        std=std,
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )
    _patch_posterize(transform)
    return transform


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, keeping the behaviour DeiT trained with at 0 bits (a black image).

    RandAugment with magnitude noise (``mstd0.5``) reaches the top level, where
    ``PosterizeIncreasing`` keeps 0 bits; recent Pillow refuses that.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: Any) -> None:
    from timm.data import auto_augment

    for stage in getattr(transform, "transforms", []):
        for op in getattr(stage, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch's CPU generator for one sample's augmentation.

    timm's transforms draw from exactly these (crops and RandAugment from
    ``random``, RandAugment's op choice from ``numpy``, flips and random
    erasing from torch on the CPU). In the training process
    (``data.num_workers=0``) the three are restored afterwards, so the
    trainer's own draws (mixup, dropout on the CPU) go on as if no image had
    been read. CUDA's generators are neither seeded nor touched:
    ``torch.manual_seed`` would reseed them, resetting a GPU run's dropout
    and drop-path stream at every sample. In a DataLoader worker the streams
    serve only this loop and restoring them would cost about a tenth of a
    millisecond a sample, so they are left seeded.
    """
    restore = get_worker_info() is None
    if restore:
        py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if restore:
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_rng_state(pt)


@contextmanager
def _truncated_images(allowed: bool) -> Iterator[None]:
    """Let PIL decode truncated files (grey where data is missing) only if asked, whatever the process set."""
    from PIL import ImageFile

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = allowed
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class ImageDataset(Dataset):
    """A ``datasets.Dataset`` split decoded and transformed on access (in the DataLoader workers).

    A key is an index, or ``(index, seed)`` from :class:`ShardSampler`, in
    which case the augmentation runs under that seed. An image that does not
    decode raises :class:`DataError` naming it and ``split_name``; with
    ``skip_corrupt`` the next readable image of the split (and its label)
    stands in for it, so the epoch's length, order and seeds do not change.
    Skipped rows are marked in shared memory, so the training process sees
    those its workers found (:meth:`skipped`).
    """

    def __init__(
        self,
        split: datasets.Dataset,
        transform: Callable,
        image_column: str,
        label_column: str,
        split_name: str = "",
        skip_corrupt: bool = False,
        load_truncated: bool = False,
    ) -> None:
        self.split = split
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.split_name = split_name
        self.skip_corrupt = skip_corrupt
        self.load_truncated = load_truncated
        feature = split.features[image_column]
        # rows are read undecoded and decoded here, so a failure can name the file
        self._image_feature = feature if isinstance(feature, datasets.Image) and feature.decode else None
        self._rows = split
        self._columns = None
        if self._image_feature is not None:
            self._rows = split.cast_column(image_column, datasets.Image(mode=feature.mode, decode=False))
            if getattr(self._rows, "_indices", None) is None:  # rows are the table's rows: read them from Arrow
                table = self._rows.data  # (a fifth of the per-image overhead of Dataset.__getitem__)
                self._columns = (table.column(image_column), table.column(label_column))
        self._bad = torch.zeros(len(split), dtype=torch.bool).share_memory_() if skip_corrupt else None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self._read_or_skip(int(index))
        if seed is None:
            return self.transform(image), label
        with _seeded(int(seed)):
            return self.transform(image), label

    def describe(self, index: int) -> str:
        """Row ``index`` as a user finds it: its file path where the data set records one."""
        path = (self._row(index)[0] or {}).get("path") if self._image_feature is not None else None
        return str(path) if path else f"row {index}"

    def skipped(self) -> list[str]:
        """The rows skipped as unreadable so far, by this process and its workers."""
        if self._bad is None:
            return []
        return [self.describe(int(i)) for i in torch.nonzero(self._bad).flatten()]

    def _row(self, index: int) -> tuple[Any, int]:
        """The image value (undecoded where the column is an ``Image`` feature) and the label of row ``index``."""
        if self._columns is not None:
            images, labels = self._columns
            return images[index].as_py(), int(labels[index].as_py())
        row = self._rows[index]
        return row[self.image_column], int(row[self.label_column])

    def _read(self, index: int) -> tuple[Any, int]:
        value, label = self._row(index)
        if self._image_feature is None:
            return value.convert("RGB"), label
        try:
            with _truncated_images(self.load_truncated):
                image = self._image_feature.decode_example(value)
                return (image if image.mode == "RGB" else image.convert("RGB")), label  # RGB: no copy
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            reason = _one_line(exc)
            hint = "; data.load_truncated=true decodes truncated files with the missing part grey" * (
                "image file is truncated" in reason
            )
            raise _Unreadable(
                f"cannot decode {self.describe(index)} in the {self.split_name!r} split ({reason}); replace or "
                f"delete the file, or set data.skip_corrupt=true to skip unreadable images{hint}"
            ) from None

    def _read_or_skip(self, index: int) -> tuple[Any, int]:
        if self._bad is None:
            return self._read(index)
        size = len(self.split)
        for step in range(size):
            candidate = (index + step) % size
            if self._bad[candidate]:
                continue
            try:
                return self._read(candidate)
            except _Unreadable as exc:
                self._bad[candidate] = True
                logger.warning(
                    "skipped an unreadable image (data.skip_corrupt=true), %s image(s) of the %r split so far: %s",
                    int(self._bad.sum()),
                    self.split_name,
                    str(exc).split("; replace or delete")[0],
                )
        raise DataError(
            f"none of the {size} images of the {self.split_name!r} split could be decoded; "
            "check the files (for example with PIL.Image.open(path).load())"
        )


class _Unreadable(DataError):
    """An image that does not decode (a :class:`DataError`, told apart so skipping catches only these)."""


def skipped_images(loader: DataLoader) -> list[str]:
    """Images a loader skipped as unreadable (``data.skip_corrupt``), by path where known; for logs and metrics."""
    dataset = getattr(loader, "dataset", None)
    return dataset.skipped() if isinstance(dataset, ImageDataset) else []


# -- samplers ---------------------------------------------------------------------------


class ShardSampler(Sampler):
    """One rank's disjoint share of a shuffled epoch, each draw with its augmentation seed.

    The epoch's global order is a permutation drawn from ``(seed, epoch)``;
    with ``repeats > 1`` each image is repeated in place and the order cut
    back to the data set's length (DeiT's repeated augmentation). The order
    is trimmed to a multiple of ``num_replicas`` and rank ``r`` takes
    positions ``r, r + n, r + 2n...``, so the ranks' i-th batches together
    are the single-process i-th batch of the same global size.
    """

    def __init__(
        self, size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True, repeats: int = 1
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.seed, self.shuffle, self.repeats = seed, shuffle, max(1, repeats)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.num_replicas

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(epoch_seed))
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        order = order.repeat_interleave(self.repeats)[: self.size]
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator)
        end = len(self) * self.num_replicas
        positions = range(self.rank, end, self.num_replicas)
        return iter([(int(order[p]), int(seeds[p])) for p in positions])


def shard_range(size: int, num_replicas: int = 1, rank: int = 0) -> range:
    """Rank ``rank``'s contiguous block of an evaluation split: disjoint, in order, no padding."""
    return range(rank * size // num_replicas, (rank + 1) * size // num_replicas)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a training loader's sampler which epoch's order to draw."""
    node: Any = loader
    while node is not None and not hasattr(node, "set_epoch"):  # through batch samplers, skipping wrappers
        node = getattr(node, "batch_sampler", None) or getattr(node, "sampler", None)
    if node is not None:
        node.set_epoch(epoch)


# -- loaders -----------------------------------------------------------------------------


def build_dataloader(
    recipe: DictConfig,
    split: str,
    train: bool,
    batch_size: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
    limit: int | None = None,
) -> DataLoader:
    """Batches ``(images (B, 3, S, S) normalised, labels (B,) int64)`` of one split for one rank.

    ``train=True``: DeiT augmentation, a shuffled disjoint shard, incomplete
    batches dropped; call :func:`set_epoch` before each epoch. ``train=False``:
    evaluation transforms, the rank's contiguous block of the split in order,
    the last batch kept. ``limit`` keeps only the split's first ``limit`` images.
    ``data.skip_corrupt`` replaces unreadable images (see :class:`ImageDataset`).
    """
    data = recipe.data
    ds = load_split(recipe, split)
    if limit is not None:
        ds = ds.select(range(min(int(limit), len(ds))))
    dataset = ImageDataset(
        ds,
        build_transform(recipe, train),
        data.image_column,
        data.label_column,
        split_name=split,
        skip_corrupt=bool(data.skip_corrupt),
        load_truncated=bool(data.load_truncated),
    )
    if batch_size is None:
        batch_size = recipe.train.batch_size if train else recipe.eval.batch_size
    if train:
        sampler: Any = ShardSampler(
            len(dataset), num_replicas, rank, seed=int(recipe.train.seed), repeats=int(recipe.train.repeated_aug)
        )
    else:
        sampler = shard_range(len(dataset), num_replicas, rank)
    workers = int(data.num_workers)
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        sampler=sampler,
        drop_last=train,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        # the loader's own generator: creating an iterator must not consume the global RNG
        generator=torch.Generator().manual_seed(int(recipe.train.seed)),
        persistent_workers=False,
    )
