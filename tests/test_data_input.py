"""Image folders and hostile data: the scan matches the ``imagefolder`` builder, bad data is named.

Every bad-input case runs through the real entry point (``dynvit train`` /
``dynvit eval``): exit code 2 and one ``error:`` line naming the file or
folder, the split and the fix, never a traceback.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from test_training import make_image_folder, tiny_overrides

from dynvit import load_recipe
from dynvit.cli import main
from dynvit.data.errors import DataError
from dynvit.data.imagefolder import folder_split, training_classes
from dynvit.data.loading import build_dataloader, skipped_images


def jpeg_bytes(seed: int = 0, size: int = 36) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def two_class_folder(root: Path, per_class: int = 4) -> Path:
    return make_image_folder(root, {"train": ["a", "b"], "val": ["a", "b"]}, per_class=per_class)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *fragments: str) -> str:
    assert "Traceback" not in err
    assert err.count("error: ") == 1, err
    line = err[err.index("error: ") :].splitlines()[0]  # a progress bar may precede it on its line
    for fragment in fragments:
        assert fragment in line, line
    return line


def train_argv(root: Path, out: Path, *overrides: str, source: str = "imagefolder") -> list[str]:
    # 2 classes, 3 images per step, one epoch: every training image is read
    fixed = ("model.backbone.num_classes=2", "train.batch_size=3", "train.epochs=1")
    return ["train", "quickstart", *tiny_overrides(root, out, *fixed, *overrides, source=source)]


# -- the scan is the imagefolder builder, only fast ------------------------------------------------------


def test_scan_gives_the_imagefolder_builders_classes_labels_and_row_order(tmp_path):
    # class names that sort differently as strings and as numbers / by case, "a" next to "a-b" (whose files
    # sort first: "-" < "/"), unicode, a space; extensions in any case, double extensions; files the
    # builder skips: other types, hidden files and folders, __special__ folders
    root = tmp_path / "folder"
    classes = ["10", "9", "B", "a", "a-b", "a_b", "éclair", "日本", "a b"]
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for file, fmt in (("1.png", "PNG"), ("10.JPG", "JPEG"), ("2.jpeg", "JPEG"), ("x.Jpg", "JPEG")):
                Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(folder / file, fmt)
            (folder / "y.png.txt").write_bytes((folder / "1.png").read_bytes())
            (folder / "notes.txt").write_text("not an image")
            (folder / ".hidden.png").write_bytes((folder / "1.png").read_bytes())
        for special in (".cache", "__pycache__"):
            (root / split / special).mkdir()
            (root / split / special / "z.png").write_bytes((root / split / "a" / "1.png").read_bytes())

    reference = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "hf"))
    names = training_classes(root)
    assert names == reference["train"].features["label"].names == sorted(classes)
    for split in ("train", "validation"):
        expected, got = reference[split], folder_split(root, split, names)
        raw = [ds.cast_column("image", datasets.Image(decode=False))["image"] for ds in (expected, got)]
        assert [Path(r["path"]).resolve() for r in raw[1]] == [Path(r["path"]).resolve() for r in raw[0]]
        assert got["label"] == expected["label"]
        assert got.features == expected.features
        assert len(got) == len(classes) * 5


def test_images_in_subfolders_belong_to_their_class_folder(tmp_path):
    root = two_class_folder(tmp_path / "folder", per_class=2)
    (root / "train" / "b" / "more").mkdir()
    (root / "train" / "b" / "0.png").rename(root / "train" / "b" / "more" / "0.png")
    split = folder_split(root, "train", training_classes(root))
    paths = [
        Path(r["path"]).relative_to(root).as_posix()
        for r in split.cast_column("image", datasets.Image(decode=False))["image"]
    ]
    assert list(zip(paths, split["label"])) == [
        ("train/a/0.png", 0),
        ("train/a/1.png", 0),
        ("train/b/1.png", 1),
        ("train/b/more/0.png", 1),
    ]


def test_a_split_with_fewer_class_folders_keeps_the_training_labels(tmp_path):
    root = make_image_folder(tmp_path / "folder", {"train": ["a", "b", "c"], "test": ["c"]}, per_class=2)
    split = folder_split(root, "test", training_classes(root))
    assert split["label"] == [2, 2] and split.features["label"].names == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("change", "split", "message"),
    [
        (
            lambda root: [(root / "val").rename(root / "validation"), two_class_folder(root, 1)],
            "validation",
            r"has .*/val/ and .*/validation/, both read as the 'validation' split; keep one of them",
        ),
        (
            lambda root: (root / "train" / "stray.jpg").write_bytes(jpeg_bytes()),
            "train",
            r"holds 1 image\(s\) outside the class folders \(stray.jpg\); move them into their class folder",
        ),
        (
            lambda root: make_image_folder(root, {"val": ["c"]}),
            "validation",
            r"class folder\(s\) the training split lacks: c; every split must use the training split's class folders",
        ),
    ],
)
def test_folders_that_cannot_be_labelled_are_named(tmp_path, change, split, message):
    root = two_class_folder(tmp_path / "folder", per_class=1)
    change(root)
    recipe = load_recipe("quickstart", tiny_overrides(root, tmp_path / "run", source="imagefolder"))
    with pytest.raises(DataError, match=message):
        build_dataloader(recipe, split, train=False)


# -- hostile data through the command line ------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_jpeg_names_file_and_split(tmp_path, capsys, workers):
    root = two_class_folder(tmp_path / "folder")
    bad = root / "train" / "b" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 10)
    code, err = run_cli(capsys, *train_argv(root, tmp_path / "run", f"data.num_workers={workers}"))
    assert code == 2
    assert_one_line_error(
        err, f"error: cannot decode {bad} in the 'train' split (", "or set data.skip_corrupt=true to skip"
    )


def test_truncated_jpeg_names_file_and_split(tmp_path, capsys):
    root = two_class_folder(tmp_path / "folder")
    bad = root / "val" / "a" / "cut.jpg"
    data = jpeg_bytes()
    bad.write_bytes(data[: len(data) // 2])
    code, err = run_cli(capsys, *train_argv(root, tmp_path / "run"))
    assert code == 2
    assert_one_line_error(
        err, f"cannot decode {bad} in the 'validation' split (image file is truncated", "load_truncated"
    )


def test_single_class_folder_is_named(tmp_path, capsys):
    root = make_image_folder(tmp_path / "folder", {"train": ["only"], "val": ["only"]}, per_class=9)
    code, err = run_cli(capsys, *train_argv(root, tmp_path / "run"))
    assert code == 2
    assert_one_line_error(err, f"{root / 'train'} ('train' split) has a single class folder (only)", "add a folder")


def test_empty_split_on_disk_is_named(tmp_path, capsys):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = [Image.fromarray(np.full((36, 36, 3), 25 * i, dtype=np.uint8)) for i in range(9)]
    train = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(9)]}, features=features)
    empty = datasets.Dataset.from_dict({"image": [], "label": []}, features=features)
    path = tmp_path / "disk"
    datasets.DatasetDict({"train": train, "validation": empty}).save_to_disk(str(path))
    code, err = run_cli(capsys, *train_argv(path, tmp_path / "run", source="disk"))
    assert code == 2
    assert_one_line_error(err, f"the 'validation' split of the disk data set at {path} has no images (0 rows)")


def test_test_folder_without_images_is_named(tmp_path, capsys):
    root = two_class_folder(tmp_path / "folder", per_class=1)
    for name in ("a", "b"):
        (root / "test" / name).mkdir(parents=True)
    (root / "test" / "a" / "readme.txt").write_text("images go here")
    argv = tiny_overrides(
        root, tmp_path / "run", "model.backbone.num_classes=2", "eval.split=test", source="imagefolder"
    )
    code, err = run_cli(capsys, "eval", "quickstart", *argv, "--out", str(tmp_path / "eval"), "--device", "cpu")
    assert code == 2
    assert_one_line_error(err, f"{root / 'test'} ('test' split) holds no images")


def test_skip_corrupt_trains_to_the_end_and_reports_the_count(tmp_path, capsys, caplog):
    root = two_class_folder(tmp_path / "folder", per_class=5)
    (root / "train" / "a" / "broken.jpg").write_bytes(b"garbage")
    data = jpeg_bytes()
    (root / "train" / "b" / "cut.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "run"
    code, err = run_cli(capsys, *train_argv(root, out, "data.skip_corrupt=true", "train.epochs=2"))
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped an unreadable image")]
    assert len(warnings) == 2  # each file once, not once per epoch
    assert "1 image(s) of the 'train' split so far" in warnings[0]
    assert "2 image(s) of the 'train' split so far" in warnings[1]
    assert {str(root / "train" / "a" / "broken.jpg"), str(root / "train" / "b" / "cut.jpg")} == {
        w.split("cannot decode ")[1].split(" in the ")[0] for w in warnings
    }
    assert [m["epoch"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]


# -- what skipping does, and the worker boundary -----------------------------------------------------------------


def eval_recipe(root: Path, tmp_path: Path, *overrides: str):
    return load_recipe(
        "quickstart",
        tiny_overrides(root, tmp_path / "run", "model.backbone.num_classes=2", *overrides, source="imagefolder"),
    )


def test_a_skipped_image_is_replaced_by_the_next_readable_one_also_in_workers(tmp_path):
    root = two_class_folder(tmp_path / "folder", per_class=3)
    bad = root / "val" / "a" / "1.png"
    bad.write_bytes(b"not a png")  # row 1 of the split; row 2 stands in for it
    skipping = eval_recipe(root, tmp_path, "data.skip_corrupt=true", "data.num_workers=2")
    loader = build_dataloader(skipping, "validation", train=False, batch_size=2)
    images, labels = (torch.cat(parts) for parts in zip(*loader))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(images[1], images[2]) and not torch.equal(images[0], images[2])
    assert skipped_images(loader) == [str(bad)]  # found by a worker, seen by this process
    with pytest.raises(DataError, match=r"^cannot decode .*1\.png in the 'validation' split \(cannot identify"):
        list(build_dataloader(eval_recipe(root, tmp_path, "data.num_workers=1"), "validation", train=False))


def test_truncated_images_are_refused_unless_asked_for_whatever_pil_is_set_to(tmp_path, monkeypatch):
    root = two_class_folder(tmp_path / "folder", per_class=1)
    data = jpeg_bytes()
    for name in ("a", "b"):
        for image in (root / "val" / name).iterdir():
            image.unlink()
        (root / "val" / name / "cut.jpg").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set it, process-wide
    with pytest.raises(DataError, match="image file is truncated"):
        list(build_dataloader(eval_recipe(root, tmp_path), "validation", train=False))
    images, _ = next(
        iter(build_dataloader(eval_recipe(root, tmp_path, "data.load_truncated=true"), "validation", False))
    )
    assert images.shape[0] == 2
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the process's setting is left as it was


def test_worker_tracebacks_become_the_original_one_line_message():
    wrapped = (
        "Caught _Unreadable in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise _Unreadable(msg)\n'
        "dynvit.data.loading._Unreadable: cannot decode /d/x.jpg in the 'train' split (bad); fix it\n"
    )
    assert str(DataError(wrapped)) == "cannot decode /d/x.jpg in the 'train' split (bad); fix it"
    assert str(DataError("a: b\nc")) == "a: b\nc"  # anything else is kept as it is


# -- seeding -------------------------------------------------------------------------------------------------


def test_per_sample_seeding_restores_the_cpu_streams_and_leaves_cuda_alone(tmp_path, monkeypatch):
    root = two_class_folder(tmp_path / "folder", per_class=2)
    recipe = eval_recipe(root, tmp_path, "train.aa=rand-m9-mstd0.5-inc1", "train.reprob=0.5")
    dataset = build_dataloader(recipe, "train", train=True, batch_size=2).dataset

    def streams(seed: int) -> tuple:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        return torch.get_rng_state(), random.getstate(), np.random.get_state()

    def draw() -> tuple:
        return torch.rand(4), random.random(), np.random.rand()

    streams(7)
    expected = draw()
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", cuda_seeds.append)
    streams(7)
    first = dataset[(0, 12345)]
    got = draw()
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert cuda_seeds == []  # nothing reseeds (and nothing restores) a CUDA generator
    assert torch.equal(dataset[(0, 12345)][0], first[0])  # the augmentation follows the sample's seed
    assert not torch.equal(dataset[(0, 54321)][0], first[0])
