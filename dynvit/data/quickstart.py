"""Embedded quickstart data set: small, real, and built so that looking closer pays off.

LF-ViT first classifies a half-resolution copy of an image and only re-looks at a
small region at full resolution when it is unsure. A data set that shows off (and
tests) that behaviour needs images whose class evidence is *small*: readable at full
resolution, degraded at half resolution, and surrounded by distracting content.

This module renders such a data set locally, without any download, from real images
that scikit-learn ships: the handwritten digits of ``load_digits`` (1797 scans of
8x8 pixels, 16 grey levels) are the class evidence, the two sample photographs of
``load_sample_images`` provide natural backgrounds, and fragments of other digits are
scattered around as clutter. Everything is deterministic from a seed, and the splits
are disjoint by source digit, so test accuracy measures generalisation to unseen
handwriting rather than memorised scans.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

__all__ = [
    "CLASS_NAMES",
    "MAX_BOX_AREA_FRACTION",
    "QUICKSTART_VERSION",
    "build_quickstart",
    "export_imagefolder",
    "load_quickstart",
    "quickstart_cache_path",
]

#: Bumped whenever the rendering changes, so that old caches are never reused.
QUICKSTART_VERSION = "3"

#: Class names, one per digit.
CLASS_NAMES: list[str] = [str(i) for i in range(10)]

#: Upper bound on the fraction of the image covered by the target digit's box; the
#: evidence must stay small for the half-resolution glance to be insufficient.
MAX_BOX_AREA_FRACTION = 0.15

# Target digit side as a fraction of the image side (20..24 px at 64 px, 10-14% of the area): a
# small ViT trained for minutes on a CPU does not learn to find a smaller digit.
_DIGIT_FRACTION = (20.0 / 64.0, 24.0 / 64.0)
# The target digit's corner lies on a lattice of this fraction of the image side (8 px at 64 px,
# the full-resolution patch of the quickstart ViT). A ViT trained from scratch must learn every
# sub-patch offset of a small object separately; with free positions the quickstart model stayed
# near chance for its whole CPU budget (16% test accuracy after 6 epochs, against 74% on the lattice).
# The position is still random (6 x 6 places at 64 px), and at half resolution the lattice is half a
# patch, so stage 1 still sees the digit straddling patches.
_POSITION_LATTICE = 8.0 / 64.0
# Fraction of source digits per split (train, validation); the rest is test.
_SPLIT_FRACTIONS = (0.65, 0.15)
# Number of clutter fragments per image and their side, in source (8x8) pixels.
_CLUTTER_COUNT = (1, 3)
_FRAGMENT_SIDE = (3, 5)
# Background: side of the square crop taken from a sample photograph, relative to
# the image side, and the contrast kept after flattening it.
_BACKGROUND_CROP = (1.5, 5.0)
_BACKGROUND_CONTRAST = (0.1, 0.2)
# Exponent applied to the digit's grey levels: > 1 thins the strokes, which survive
# at full resolution but blur into the background when the image is halved.
_STROKE_GAMMA = 2.5
# Luminance difference between the target digit and the mean background under it: the digit is
# always the lighter, so its polarity is fixed (a linear patch embedding cannot cheaply read a
# shape whose sign flips); the background photo is kept dark enough for that.
_TARGET_CONTRAST = (0.4, 0.6)
_BACKGROUND_LEVEL = (0.15, 0.45)
# Hue of the target: a tint of this strength around its grey level (clutter keeps full colours).
_TARGET_TINT = 0.3
# Smallest image side: the target digit must keep about the 8x8 resolution of its scan.
_MIN_IMAGE_SIZE = 32

_SPLITS = ("train", "validation", "test")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMAGEFOLDER_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def _features() -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=CLASS_NAMES),
            "box": datasets.Sequence(datasets.Value("int32"), length=4),
            "source_id": datasets.Value("int32"),
        }
    )


@lru_cache(maxsize=1)
def _sources() -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """Digits (N, 8, 8) float32 in [0, 1], their labels, and the sample photos (uint8)."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    photos = tuple(np.ascontiguousarray(p, dtype=np.uint8) for p in load_sample_images().images)
    return images, labels, photos


@lru_cache(maxsize=1)
def _photo_pyramids() -> tuple[list[Image.Image], ...]:
    """Each sample photo at full, half, quarter and eighth size, converted once.

    Resizing a background crop from the level just above the output size is several
    times cheaper than from the full photo, and just as smooth.
    """
    pyramids = []
    for photo in _sources()[2]:
        levels = [Image.fromarray(photo)]
        for _ in range(3):
            levels.append(levels[-1].reduce(2))
        pyramids.append(levels)
    return tuple(pyramids)


@lru_cache(maxsize=64)
def _resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Bilinear interpolation matrix (n_out, n_in), half-pixel centres, edges clamped."""
    centres = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    centres = np.clip(centres, 0.0, n_in - 1)
    lo = np.floor(centres).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (centres - lo).astype(np.float32)
    matrix = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, lo), 1.0 - frac)
    np.add.at(matrix, (rows, hi), frac)
    return matrix


def _upscale(patch: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a small 2-D patch via two matrix products (no pixel loops)."""
    return _resize_matrix(height, patch.shape[0]) @ patch @ _resize_matrix(width, patch.shape[1]).T


def _partition(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Stratified split of the source digit indices; disjoint by construction."""
    parts: dict[str, list[np.ndarray]] = {split: [] for split in _SPLITS}
    for cls in range(len(CLASS_NAMES)):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_train = int(round(_SPLIT_FRACTIONS[0] * len(members)))
        n_val = int(round(_SPLIT_FRACTIONS[1] * len(members)))
        parts["train"].append(members[:n_train])
        parts["validation"].append(members[n_train : n_train + n_val])
        parts["test"].append(members[n_train + n_val :])
    return {split: np.sort(np.concatenate(chunks)) for split, chunks in parts.items()}


def _assign_sources(pool: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``count`` source digits from ``pool`` with balanced classes.

    Each class gets ``count // 10`` images (the first ``count % 10`` classes one
    more), cycling through that class's sources in a random order so every source is
    used about equally often. With ``count >= 10`` every class is present.
    """
    n_classes = len(CLASS_NAMES)
    chosen = []
    for cls in range(n_classes):
        want = count // n_classes + (1 if cls < count % n_classes else 0)
        members = pool[labels[pool] == cls]
        if want == 0:
            continue
        if len(members) == 0:
            raise ValueError(f"no source digit of class {cls} in this split")
        reps = -(-want // len(members))
        cycle = np.concatenate([rng.permutation(members) for _ in range(reps)])
        chosen.append(cycle[:want])
    return rng.permutation(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of a sample photo, resized and flattened to low contrast."""
    pyramid = _photo_pyramids()[int(rng.integers(2))]
    pw, ph = pyramid[0].size
    side = int(rng.uniform(*_BACKGROUND_CROP) * size)
    side = max(8, min(side, ph, pw))
    y0 = int(rng.integers(0, ph - side + 1))
    x0 = int(rng.integers(0, pw - side + 1))
    flip = bool(rng.integers(2))
    contrast = float(rng.uniform(*_BACKGROUND_CONTRAST))
    level = float(rng.uniform(*_BACKGROUND_LEVEL))
    # the smallest pyramid level that still has at least `size` pixels across the crop
    depth = 0
    while depth + 1 < len(pyramid) and side / 2 ** (depth + 1) >= size:
        depth += 1
    source = pyramid[depth]
    scale = 2.0**depth
    box = (
        x0 / scale,
        y0 / scale,
        min((x0 + side) / scale, source.size[0]),
        min((y0 + side) / scale, source.size[1]),
    )
    crop = source.resize((size, size), Image.Resampling.BILINEAR, box=box)
    out = np.asarray(crop, dtype=np.float32) / 255.0
    if flip:
        out = out[:, ::-1]
    return (out - out.mean()) * contrast + level


def _stroke_alpha(upscaled: np.ndarray) -> np.ndarray:
    """Opacity of an upscaled digit patch; thins the strokes (see ``_STROKE_GAMMA``)."""
    return np.clip(upscaled, 0.0, 1.0) ** _STROKE_GAMMA


def _composite(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, y: int, x: int) -> None:
    """Alpha-blend a solid colour through ``alpha`` onto ``canvas`` at (y, x), clipped."""
    size = canvas.shape[0]
    h, w = alpha.shape
    ya, xa = max(y, 0), max(x, 0)
    yb, xb = min(y + h, size), min(x + w, size)
    if ya >= yb or xa >= xb:
        return
    a = alpha[ya - y : yb - y, xa - x : xb - x, None]
    region = canvas[ya:yb, xa:xb]
    region *= 1.0 - a
    region += a * colour


@dataclass(frozen=True)
class _Rendered:
    images: list[bytes]
    labels: np.ndarray
    boxes: np.ndarray
    source_ids: np.ndarray


def _render_split(
    pool: np.ndarray, count: int, image_size: int, rng: np.random.Generator, draw_target: bool
) -> _Rendered:
    digits, labels, _ = _sources()
    source_ids = _assign_sources(pool, labels, count, rng)
    lo = max(4, int(round(_DIGIT_FRACTION[0] * image_size)))
    hi = max(lo, int(round(_DIGIT_FRACTION[1] * image_size)))
    max_side = int(np.floor(np.sqrt(MAX_BOX_AREA_FRACTION) * image_size))
    hi = min(hi, max_side)
    lo = min(lo, hi)
    lattice = max(1, int(round(_POSITION_LATTICE * image_size)))
    if lo < 4 or hi >= image_size:
        raise ValueError(f"image_size={image_size} is too small for the quickstart data set")

    images: list[bytes] = []
    boxes = np.zeros((count, 4), dtype=np.int32)
    for i, sid in enumerate(source_ids):
        canvas = _background(image_size, rng)

        # Target geometry and colour are drawn first so that the clutter cannot change
        # them, and always drawn, so that suppressing the target leaves the rest of the
        # image (and the random stream) unchanged.
        side = int(rng.integers(lo, hi + 1))
        ty = int(rng.integers(0, image_size - side + 1)) // lattice * lattice
        tx = int(rng.integers(0, image_size - side + 1)) // lattice * lattice
        opacity = float(rng.uniform(0.8, 1.0))
        hue = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        offset = float(rng.uniform(*_TARGET_CONTRAST))

        # Clutter: partial crops of other digits of this split, about the target's scale.
        n_clutter = int(rng.integers(_CLUTTER_COUNT[0], _CLUTTER_COUNT[1] + 1))
        others = pool[rng.integers(0, len(pool), size=n_clutter)]
        others = np.where(others == sid, pool[(np.searchsorted(pool, sid) + 1) % len(pool)], others)
        for other in others:
            fh, fw = (int(v) for v in rng.integers(_FRAGMENT_SIDE[0], _FRAGMENT_SIDE[1] + 1, size=2))
            oy = int(rng.integers(1, 8 - fh)) if fh < 7 else 0
            ox = int(rng.integers(1, 8 - fw)) if fw < 7 else 0
            scale = float(rng.uniform(lo, hi + 1)) / 8.0
            h, w = max(2, int(round(fh * scale))), max(2, int(round(fw * scale)))
            fy = int(rng.integers(-h // 2, image_size - h // 2))
            fx = int(rng.integers(-w // 2, image_size - w // 2))
            colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
            strength = float(rng.uniform(0.5, 0.9))
            frag = _upscale(digits[other, oy : oy + fh, ox : ox + fw], h, w)
            alpha = _stroke_alpha(frag) * strength
            _composite(canvas, alpha, colour, fy, fx)

        box = (tx, ty, tx + side, ty + side)
        boxes[i] = box
        if draw_target:
            # A light tint whose luminance lies well above the local background, so the digit stands out.
            local = float(canvas[ty : ty + side, tx : tx + side].mean())
            colour = np.clip(_TARGET_TINT * (hue - hue.mean()) + local + offset, 0.0, 1.0)
            alpha = _stroke_alpha(_upscale(digits[sid], side, side))
            _composite(canvas, alpha * opacity, colour, ty, tx)

        pixels = np.clip(canvas * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        images.append(buffer.getvalue())
    return _Rendered(images, labels[source_ids], boxes, source_ids.astype(np.int32))


def _build(
    seed: int,
    image_size: int,
    num_train: int,
    num_val: int,
    num_test: int,
    draw_target: bool = True,
) -> datasets.DatasetDict:
    """Render all splits; ``draw_target=False`` leaves out only the target digit."""
    _, labels, _ = _sources()
    # Independent streams: the partition and each split have their own generator, so
    # changing one split's size does not change the images of the others.
    streams = np.random.SeedSequence(seed).spawn(1 + len(_SPLITS))
    pools = _partition(labels, np.random.default_rng(streams[0]))
    counts = {"train": num_train, "validation": num_val, "test": num_test}
    result = {}
    for split, stream in zip(_SPLITS, streams[1:]):
        rendered = _render_split(pools[split], counts[split], image_size, np.random.default_rng(stream), draw_target)
        result[split] = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": b, "path": None} for b in rendered.images],
                "label": rendered.labels.tolist(),
                "box": rendered.boxes.tolist(),
                "source_id": rendered.source_ids.tolist(),
            },
            features=_features(),
            split=datasets.Split(split),
        )
    return datasets.DatasetDict(result)


def build_quickstart(
    seed: int = 0,
    image_size: int = 64,
    num_train: int = 6000,
    num_val: int = 1000,
    num_test: int = 2000,
) -> datasets.DatasetDict:
    """Render the quickstart data set in memory (no caching, no files written).

    Same arguments give byte-identical PNG images. Splits ``train``, ``validation`` and
    ``test`` are rendered from disjoint sets of source digits; columns are ``image``,
    ``label`` (digit class), ``box`` (target digit ``[x0, y0, x1, y1]``, exclusive
    ends) and ``source_id`` (index into ``sklearn.datasets.load_digits()``).
    """
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return _build(seed, image_size, num_train, num_val, num_test)


def _default_cache_dir() -> Path:
    env = os.environ.get("DYNVIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dynvit"


def quickstart_cache_path(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    image_size: int = 64,
    num_train: int = 6000,
    num_val: int = 1000,
    num_test: int = 2000,
) -> Path:
    """Folder that caches the data set for these parameters.

    The name holds the version and every generation parameter, so a changed parameter
    (or a new rendering version) never picks up a stale cache.
    """
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    name = f"quickstart-v{QUICKSTART_VERSION}-seed{seed}-size{image_size}-train{num_train}-val{num_val}-test{num_test}"
    return root / name


def load_quickstart(cache_dir: str | os.PathLike | None = None, **params: int) -> datasets.DatasetDict:
    """Load the quickstart data set, building and caching it on first use.

    ``params`` are those of :func:`build_quickstart`. The cache lives under
    ``cache_dir`` (default ``$DYNVIT_CACHE`` or ``~/.cache/dynvit``). It is written
    into a temporary folder next to the target and renamed into place, so an
    interrupted build never leaves a folder that a later call would trust.
    """
    target = quickstart_cache_path(cache_dir, **params)
    if not target.is_dir():
        dataset = build_quickstart(**params)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A hidden name that is never the target's; mkdir honours the umask (unlike mkdtemp).
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            dataset.save_to_disk(str(tmp))
            try:
                os.replace(tmp, target)
            except OSError:
                # Another process finished the same build first; its copy is complete.
                if not target.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target))


def export_imagefolder(dataset: datasets.DatasetDict, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/{train,val,test}/<class>/<n>.png``, the ImageNet folder layout.

    Lets tools that expect class folders (torchvision ``ImageFolder``, the Hugging Face
    ``imagefolder`` builder) read the quickstart data. Returns ``out_dir``.
    """
    out = Path(out_dir)
    for split, ds in dataset.items():
        folder = out / _IMAGEFOLDER_SPLITS.get(split, split)
        names = ds.features["label"].names
        for name in names:
            (folder / name).mkdir(parents=True, exist_ok=True)
        raw = ds.cast_column("image", datasets.Image(decode=False))
        for n, (image, label) in enumerate(zip(raw["image"], raw["label"])):
            data = image["bytes"] if image["bytes"] is not None else Path(image["path"]).read_bytes()
            if not data.startswith(_PNG_SIGNATURE):
                buffer = io.BytesIO()
                Image.open(io.BytesIO(data)).save(buffer, format="PNG")
                data = buffer.getvalue()
            (folder / names[label] / f"{n}.png").write_bytes(data)
    return out
