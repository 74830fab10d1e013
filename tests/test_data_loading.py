"""Data loading: sources, evaluation order and transforms, disjoint shards, replayable augmentation."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import skip_first_batches
from test_training import CLASSES, make_disk_dataset, make_image_folder, tiny_recipe
from torchvision import transforms

from dynvit.data.loading import DataError, ShardSampler, build_dataloader, class_names, set_epoch, validate_data


@pytest.fixture(scope="module")
def disk_data(tmp_path_factory):
    return make_disk_dataset(tmp_path_factory.mktemp("data"), num_train=32, num_val=13)


def batches(loader, epoch=None):
    if epoch is not None:
        set_epoch(loader, epoch)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_eval_loader_keeps_order_and_the_last_batch(disk_data, tmp_path):
    recipe = tiny_recipe(disk_data, tmp_path)
    loader = build_dataloader(recipe, "validation", train=False, batch_size=5)
    got = batches(loader)
    assert [len(labels) for _, labels in got] == [5, 5, 3]
    images, labels = got[0]
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert torch.cat([labels for _, labels in got]).tolist() == [i % len(CLASSES) for i in range(13)]
    assert class_names(recipe) == CLASSES


def test_eval_transform_is_resize_to_size_over_crop_pct_then_centre_crop(disk_data, tmp_path):
    recipe = tiny_recipe(disk_data, tmp_path, "data.crop_pct=0.875")
    image = datasets.load_from_disk(str(disk_data))["validation"][0]["image"]  # 40 x 40
    expected = transforms.Compose(
        [
            transforms.Resize(36, interpolation=transforms.InterpolationMode.BICUBIC),  # floor(32 / 0.875)
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )(image)
    first = next(iter(build_dataloader(recipe, "validation", train=False, batch_size=1)))[0][0]
    assert torch.allclose(first, expected, atol=1e-6)


@pytest.mark.parametrize("replicas", [2, 3])
def test_eval_shards_are_disjoint_contiguous_blocks(disk_data, tmp_path, replicas):
    recipe = tiny_recipe(disk_data, tmp_path)
    whole = batches(build_dataloader(recipe, "validation", train=False, batch_size=4))
    shards = [
        batches(build_dataloader(recipe, "validation", train=False, batch_size=4, num_replicas=replicas, rank=r))
        for r in range(replicas)
    ]
    sizes = [sum(len(labels) for _, labels in shard) for shard in shards]
    assert sum(sizes) == 13 and max(sizes) - min(sizes) <= 1  # nothing padded, nothing dropped
    joined = torch.cat([images for shard in shards for images, _ in shard])
    assert torch.equal(joined, torch.cat([images for images, _ in whole]))


def test_each_global_batch_is_split_across_ranks_with_identical_augmentation(disk_data, tmp_path):
    # DeiT augmentation on: the ranks' i-th batches interleave into the single-process i-th batch,
    # pixel for pixel, because each draw carries its own augmentation seed
    recipe = tiny_recipe(disk_data, tmp_path, "train.repeated_aug=1")
    single = batches(build_dataloader(recipe, "train", train=True, batch_size=8), epoch=1)
    ranks = [
        batches(build_dataloader(recipe, "train", train=True, batch_size=4, num_replicas=2, rank=r), epoch=1)
        for r in range(2)
    ]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 4
    for i, (images, labels) in enumerate(single):
        shard_images = torch.stack([ranks[0][i][0], ranks[1][i][0]], dim=1).flatten(0, 1)
        shard_labels = torch.stack([ranks[0][i][1], ranks[1][i][1]], dim=1).flatten()
        assert torch.equal(shard_labels, labels)
        assert torch.equal(shard_images, images)
    seen = [set(torch.cat([labels for _, labels in rank]).tolist()) for rank in ranks]
    assert seen[0] and seen[1]


def test_training_order_and_augmentation_depend_only_on_seed_epoch_and_position(disk_data, tmp_path):
    recipe = tiny_recipe(disk_data, tmp_path)
    loader = build_dataloader(recipe, "train", train=True, batch_size=8)
    first, again, other = batches(loader, epoch=0), batches(loader, epoch=0), batches(loader, epoch=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])
    # the same draws from worker processes
    workers = tiny_recipe(disk_data, tmp_path, "data.num_workers=2")
    assert all(
        torch.equal(a[0], b[0])
        for a, b in zip(first, batches(build_dataloader(workers, "train", train=True, batch_size=8), epoch=0))
    )
    # and after skipping, as a resumed run does
    skipped = batches(skip_first_batches(loader, 2), epoch=0)
    assert len(skipped) == len(first) - 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[2:], skipped))
    # another seed, another order
    reseeded = tiny_recipe(disk_data, tmp_path, "train.seed=1")
    assert not torch.equal(first[0][1], batches(build_dataloader(reseeded, "train", True, batch_size=8), 0)[0][1])


def test_repeated_augmentation_repeats_each_image_with_new_seeds():
    draws = list(ShardSampler(30, seed=0, repeats=3))
    assert len(draws) == 30
    indices = [index for index, _ in draws]
    assert all(indices[i] == indices[i + 1] == indices[i + 2] for i in range(0, 30, 3))
    assert len(set(indices)) == 10 and len({seed for _, seed in draws}) == 30


def test_training_shards_are_disjoint_and_even():
    shards = [list(ShardSampler(103, num_replicas=4, rank=r, seed=3)) for r in range(4)]
    assert {len(shard) for shard in shards} == {25}  # 103 // 4: the tail is dropped, not padded
    indices = [index for shard in shards for index, _ in shard]
    assert len(indices) == len(set(indices)) == 100
    with pytest.raises(ValueError, match="rank 4"):
        ShardSampler(10, num_replicas=4, rank=4)


def test_imagefolder_source(tmp_path):
    root = make_image_folder(tmp_path / "folder", {"train": ["cat", "dog"], "val": ["cat", "dog"]}, per_class=3)
    recipe = tiny_recipe(root, tmp_path / "run", "model.backbone.num_classes=2", source="imagefolder")
    assert validate_data(recipe) == ["cat", "dog"]
    assert class_names(recipe) == ["cat", "dog"]
    labels = torch.cat([labels for _, labels in build_dataloader(recipe, "validation", train=False)])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    images, labels = next(iter(build_dataloader(recipe, "train", train=True, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and set(labels.tolist()) <= {0, 1}


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"train": [], "val": []}, r"no images; put each class's images in their own folder"),
        ({"train": ["a", "b"]}, r"no folder for the 'validation' split"),
        ({"train": ["a", "b", "c"], "val": ["a", "b", "d"]}, r"only in train: c; only in validation: d"),
    ],
)
def test_bad_image_folders_are_named(tmp_path, layout, message):
    root = tmp_path / "folder"
    for split in layout:
        (root / split).mkdir(parents=True)
    make_image_folder(root, {split: names for split, names in layout.items() if names})
    recipe = tiny_recipe(root, tmp_path / "run", source="imagefolder")
    with pytest.raises(DataError, match=message):
        validate_data(recipe)


def test_empty_class_folder_and_loose_images_are_named(tmp_path):
    root = make_image_folder(tmp_path / "folder", {"train": ["a", "b"], "val": ["a", "b"]})
    for image in (root / "val" / "b").iterdir():
        image.unlink()
    recipe = tiny_recipe(root, tmp_path / "run", source="imagefolder")
    with pytest.raises(DataError, match=r"val: no images in the class folder\(s\) b"):
        validate_data(recipe)
    loose = tmp_path / "loose"
    make_image_folder(loose, {"train": ["a"], "val": ["a"]})
    for image in (loose / "train" / "a").iterdir():
        image.rename(loose / "train" / image.name)
    (loose / "train" / "a").rmdir()
    with pytest.raises(DataError, match=r"images but no class folders"):
        validate_data(tiny_recipe(loose, tmp_path / "run", source="imagefolder"))


def test_disk_splits_with_different_class_lists(tmp_path):
    def split(names):
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        image = np.zeros((8, 8, 3), dtype=np.uint8)
        return datasets.Dataset.from_dict({"image": [image], "label": [0]}, features=features)

    path = tmp_path / "disk"
    datasets.DatasetDict({"train": split(["a", "b"]), "validation": split(["a", "c"])}).save_to_disk(str(path))
    with pytest.raises(DataError, match="class lists of 'train' and 'validation' differ"):
        validate_data(tiny_recipe(path, tmp_path / "run", "model.backbone.num_classes=2"))


@pytest.mark.slow
def test_quickstart_source(tmp_path):
    from dynvit import load_recipe

    recipe = load_recipe("quickstart", [f"train.output_dir={tmp_path}"])
    assert validate_data(recipe) == [str(i) for i in range(10)]
    images, labels = next(iter(build_dataloader(recipe, "validation", train=False, batch_size=7, limit=7)))
    assert images.shape == (7, 3, 64, 64) and labels.shape == (7,)
