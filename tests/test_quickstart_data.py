"""The embedded quickstart data set: deterministic, leak-free splits, honest boxes, safe caching."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from dynvit.data import quickstart
from dynvit.data.quickstart import (
    CLASS_NAMES,
    MAX_BOX_AREA_FRACTION,
    build_quickstart,
    export_imagefolder,
    load_quickstart,
    quickstart_cache_path,
)

SMALL = dict(num_train=60, num_val=20, num_test=20)


@pytest.fixture(scope="module")
def small() -> datasets.DatasetDict:
    return build_quickstart(seed=0, **SMALL)


def raw_images(ds: datasets.Dataset) -> list[bytes]:
    return [im["bytes"] for im in ds.cast_column("image", datasets.Image(decode=False))["image"]]


def pixels(ds: datasets.Dataset) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in ds["image"]]).astype(np.int16)


def test_schema(small):
    assert list(small) == ["train", "validation", "test"]
    assert {k: len(v) for k, v in small.items()} == {"train": 60, "validation": 20, "test": 20}
    features = small["train"].features
    assert isinstance(features["image"], datasets.Image)
    assert features["label"].names == CLASS_NAMES == [str(i) for i in range(10)]
    image = small["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (64, 64)
    assert len(small["train"][0]["box"]) == 4


def test_same_seed_is_byte_identical_and_other_seed_differs(small):
    again = build_quickstart(seed=0, **SMALL)
    other = build_quickstart(seed=1, **SMALL)
    for split in small:
        assert raw_images(again[split]) == raw_images(small[split])
        assert again[split]["label"] == small[split]["label"]
        assert again[split]["box"] == small[split]["box"]
        assert again[split]["source_id"] == small[split]["source_id"]
        assert raw_images(other[split]) != raw_images(small[split])
        # not merely a reordering: most images of the other seed are new
        assert len(set(raw_images(other[split])) & set(raw_images(small[split]))) == 0


def test_split_sizes_do_not_change_other_splits(small):
    bigger_train = build_quickstart(seed=0, num_train=80, num_val=20, num_test=20)
    assert raw_images(bigger_train["test"]) == raw_images(small["test"])
    assert raw_images(bigger_train["validation"]) == raw_images(small["validation"])


def test_splits_disjoint_by_source_and_every_class_present(small):
    sources = {split: set(ds["source_id"]) for split, ds in small.items()}
    assert not sources["train"] & sources["validation"]
    assert not sources["train"] & sources["test"]
    assert not sources["validation"] & sources["test"]
    from sklearn.datasets import load_digits

    digit_labels = load_digits().target
    for split, ds in small.items():
        assert set(ds["label"]) == set(range(10)), split
        # the label is the class of the source digit actually drawn
        assert list(digit_labels[ds["source_id"]]) == ds["label"]


def test_partition_is_disjoint_over_all_sources():
    _, labels, _ = quickstart._sources()
    pools = quickstart._partition(labels, np.random.default_rng(0))
    together = np.concatenate(list(pools.values()))
    assert len(together) == len(np.unique(together)) == len(labels) == 1797
    fractions = {split: len(pool) / len(labels) for split, pool in pools.items()}
    assert fractions["train"] == pytest.approx(0.65, abs=0.01)
    assert fractions["validation"] == pytest.approx(0.15, abs=0.01)


@pytest.mark.parametrize("image_size", [64, 96])
def test_boxes_inside_and_small(image_size):
    ds = build_quickstart(seed=3, image_size=image_size, num_train=40, num_val=10, num_test=10)
    for split in ds.values():
        boxes = np.array(split["box"])
        x0, y0, x1, y1 = boxes.T
        assert (x0 >= 0).all() and (y0 >= 0).all()
        assert (x1 <= image_size).all() and (y1 <= image_size).all()
        assert (x1 > x0).all() and (y1 > y0).all()
        area = (x1 - x0) * (y1 - y0) / image_size**2
        assert (area <= MAX_BOX_AREA_FRACTION).all()
        assert (area <= (24 / 64) ** 2 + 1e-9).all()  # the intended size (at most 24 px at 64), under the hard cap
        # the digit's corner sits on the lattice of full-resolution patches (8 px at 64), at varied places
        lattice = image_size // 8
        assert (x0 % lattice == 0).all() and (y0 % lattice == 0).all()
        assert len(set(x0.tolist())) >= 4 and len(set(y0.tolist())) >= 4
        assert split[0]["image"].size == (image_size, image_size)


def test_digit_is_drawn_inside_its_box_and_nowhere_else(small):
    # same random stream, target digit left out: only the pixels inside the box may change
    blank = quickstart._build(0, 64, draw_target=False, **SMALL)
    for split in small:
        with_digit, without = pixels(small[split]), pixels(blank[split])
        assert small[split]["box"] == blank[split]["box"]
        strong = []
        for img, bg, (x0, y0, x1, y1) in zip(with_digit, without, small[split]["box"]):
            diff = np.abs(img - bg).max(axis=-1)
            inside = np.zeros(diff.shape, dtype=bool)
            inside[y0:y1, x0:x1] = True
            assert (diff[~inside] == 0).all()
            # a visible digit in every box: some pixels change by more than a quarter of the range
            assert diff[inside].max() > 70
            assert (diff[inside] > 40).mean() > 0.02
            strong.append((diff[inside] > 60).mean())
        assert np.median(strong) > 0.1


def test_digit_is_lighter_than_what_it_covers(small):
    # fixed polarity: wherever the target digit changes a pixel noticeably, it makes it lighter
    blank = quickstart._build(0, 64, draw_target=False, **SMALL)
    for split in small:
        with_digit, without = pixels(small[split]).mean(axis=-1), pixels(blank[split]).mean(axis=-1)
        changed = np.abs(with_digit - without) > 20
        assert changed.any()
        assert (with_digit[changed] > without[changed]).mean() > 0.95  # a bright clutter stroke beneath may be darkened


def test_digit_stands_out_from_local_background(small):
    # contrast statistic: the box holds more extreme pixels than a same-sized ring around it
    contrasts = []
    for img, (x0, y0, x1, y1) in zip(pixels(small["train"]).mean(axis=-1), small["train"]["box"]):
        patch = img[y0:y1, x0:x1]
        contrasts.append(np.percentile(np.abs(patch - np.median(patch)), 95))
    assert np.median(contrasts) > 50


def test_build_rejects_bad_parameters():
    with pytest.raises(ValueError):
        build_quickstart(num_train=-1)
    with pytest.raises(ValueError):
        build_quickstart(image_size=16, num_train=10, num_val=10, num_test=10)


@pytest.fixture
def build_counter(monkeypatch):
    calls = []
    real = quickstart.build_quickstart

    def counting(**params):
        calls.append(params)
        return real(**params)

    monkeypatch.setattr(quickstart, "build_quickstart", counting)
    return calls


def test_cache_round_trip_builds_once(tmp_path, build_counter):
    first = load_quickstart(tmp_path, **SMALL)
    second = load_quickstart(tmp_path, **SMALL)
    assert len(build_counter) == 1
    target = quickstart_cache_path(tmp_path, **SMALL)
    assert target.is_dir()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary folder left behind
    probe = tmp_path / "probe"
    probe.mkdir()
    assert target.stat().st_mode == probe.stat().st_mode  # ordinary permissions, not a private temp dir's
    probe.rmdir()
    for split in first:
        assert raw_images(first[split]) == raw_images(second[split])
        assert first[split]["label"] == second[split]["label"] == build_quickstart(**SMALL)[split]["label"]
        assert first[split]["box"] == second[split]["box"]

    # a changed parameter never reuses the old cache
    other = load_quickstart(tmp_path, seed=1, **SMALL)
    assert len(build_counter) == 2
    assert raw_images(other["train"]) != raw_images(first["train"])


def test_cache_key_names_every_parameter(tmp_path):
    base = quickstart_cache_path(tmp_path)
    variants = [
        quickstart_cache_path(tmp_path, seed=1),
        quickstart_cache_path(tmp_path, image_size=96),
        quickstart_cache_path(tmp_path, num_train=5),
        quickstart_cache_path(tmp_path, num_val=5),
        quickstart_cache_path(tmp_path, num_test=5),
    ]
    assert len({base, *variants}) == 6
    assert quickstart.QUICKSTART_VERSION in base.name


def test_default_cache_dir_from_environment(tmp_path, monkeypatch, build_counter):
    monkeypatch.setenv("DYNVIT_CACHE", str(tmp_path / "env-cache"))
    load_quickstart(**SMALL)
    assert quickstart_cache_path(None, **SMALL).parent == tmp_path / "env-cache"
    assert quickstart_cache_path(None, **SMALL).is_dir()


def test_leftover_temporary_folder_is_not_a_cache(tmp_path, build_counter):
    target = quickstart_cache_path(tmp_path, **SMALL)
    # what an interrupted build leaves behind: a half-written folder next to the target
    leftover = tmp_path / f".{target.name}.tmp-crashed"
    leftover.mkdir()
    (leftover / "dataset_dict.json").write_text('{"splits": ["train"]}')
    loaded = load_quickstart(tmp_path, **SMALL)
    assert len(build_counter) == 1
    assert {k: len(v) for k, v in loaded.items()} == {"train": 60, "validation": 20, "test": 20}


def test_interrupted_save_leaves_no_cache(tmp_path, monkeypatch, build_counter):
    real_save = datasets.DatasetDict.save_to_disk

    def crashing_save(self, path, **kwargs):
        self["train"].save_to_disk(str(Path(path) / "train"))  # part of the data is written, then...
        raise KeyboardInterrupt("interrupted while writing")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        load_quickstart(tmp_path, **SMALL)
    assert not quickstart_cache_path(tmp_path, **SMALL).exists()
    assert list(tmp_path.iterdir()) == []  # the partial copy was removed

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", real_save)
    loaded = load_quickstart(tmp_path, **SMALL)
    assert len(build_counter) == 2
    assert list(loaded) == ["train", "validation", "test"]


def test_export_imagefolder_loads_back(tmp_path, small):
    out = export_imagefolder(small, tmp_path / "folder")
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]
    assert (out / "val" / "3").is_dir()
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf"))
    assert sorted(loaded) == ["test", "train", "validation"]
    for split in small:
        assert len(loaded[split]) == len(small[split])
        assert loaded[split].features["label"].names == CLASS_NAMES
        assert Counter(loaded[split]["label"]) == Counter(small[split]["label"])
    # the files are the very images of the data set
    assert sorted(raw_images(small["test"])) == sorted(p.read_bytes() for p in (out / "test").rglob("*.png"))


def test_command_writes_dataset_and_imagefolder(tmp_path, capsys):
    from dynvit.commands import data as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = tmp_path / "qs"
    args = parser.parse_args(
        ["quickstart", "--out", str(out), "--seed", "2", "--imagefolder"]
        + ["--num-train", "30", "--num-val", "10", "--num-test", "10"]
    )
    assert command.run(args) == 0
    printed = capsys.readouterr().out
    assert "train 30" in printed and str(out) in printed
    saved = datasets.load_from_disk(str(out))
    expected = build_quickstart(seed=2, num_train=30, num_val=10, num_test=10)
    assert raw_images(saved["validation"]) == raw_images(expected["validation"])
    assert len(list((out / "imagefolder" / "train").rglob("*.png"))) == 30
    # refuses to write into a non-empty folder
    assert command.run(args) == 2
    assert isinstance(command.HELP, str) and command.HELP
