"""Training through Accelerate: learning, resume, two processes, checkpoints, bad input.

Everything runs a tiny two-stage LF-ViT (32 px, patch 4, width 32, two blocks)
on a few dozen random images saved with ``datasets``; the helpers at the top
are shared with ``test_data_loading.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import tolerance
from PIL import Image
from safetensors.torch import load_file

from dynvit import build_pipeline, load_recipe
from dynvit.cli import main
from dynvit.data.loading import DataError
from dynvit.pipeline import DynamicPipeline
from dynvit.recipe import RecipeError
from dynvit.training import checkpoint as ckpt
from dynvit.training import load_checkpoint_weights, train
from dynvit.training.trainer import TrainingError

# -- shared helpers ---------------------------------------------------------------------

# train() runs on the GPU where there is one: weights trained two ways agree within that device's tolerance
TRAINED = tolerance(device="cuda" if torch.cuda.is_available() else "cpu")

CLASSES = ["a", "b", "c", "d"]

# 32 px images, patch 4: 4x4 stage-1 grid, 8x8 stage-2 grid, width 32, two blocks
TINY_MODEL = [
    "model.image_size=32",
    "model.backbone.patch_size=4",
    "model.backbone.embed_dim=32",
    "model.backbone.depth=2",
    "model.backbone.num_heads=2",
    f"model.backbone.num_classes={len(CLASSES)}",
    "model.backbone.drop_path_rate=0.0",
    "model.selector.region=2",
    "model.selector.alpha=1.0",
    "model.selector.first_block=0",
]

# no augmentation, no mixup, an absolute learning rate
PLAIN_TRAINING = [
    "train.aa=null",
    "train.reprob=0.0",
    "train.hflip=0.0",
    "train.scale=[1.0,1.0]",
    "train.mixup=0.0",
    "train.cutmix=0.0",
    "train.smoothing=0.0",
    "train.repeated_aug=1",
    "train.warmup_epochs=0",
    "train.lr_base_batch=null",
    "train.lr=1e-3",
]


def class_images(labels: list[int], size: int, seed: int) -> list[Image.Image]:
    """Noisy images whose mean colour tells the class: easy to learn, different every time."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
    noise = rng.normal(0, 40, (len(labels), size, size, 3))
    pixels = np.clip(colours[np.array(labels) % len(colours)][:, None, None] + noise, 0, 255).astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]


def make_disk_dataset(root: Path, num_train: int = 32, num_val: int = 12, size: int = 40) -> Path:
    """A DatasetDict saved to disk, labels cycling through CLASSES."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    splits = {}
    for seed, (split, count) in enumerate((("train", num_train), ("validation", num_val))):
        labels = [i % len(CLASSES) for i in range(count)]
        images = class_images(labels, size, seed)
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    path = root / "disk_dataset"
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def make_image_folder(root: Path, classes: dict[str, list[str]], per_class: int = 2, size: int = 36) -> Path:
    """``root/<split>/<class>/<n>.png`` for each ``split: [class, ...]``."""
    for split, names in classes.items():
        for c, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n, image in enumerate(class_images([c] * per_class, size, seed=c)):
                image.save(folder / f"{n}.png")
    return root


def tiny_overrides(data_path: Path, output_dir: Path, *overrides: str, source: str = "disk") -> list[str]:
    return [
        *TINY_MODEL,
        f"data.source={source}",
        f"data.path={data_path}",
        "data.num_workers=0",
        "train.batch_size=8",
        "train.epochs=2",
        "train.full_image_epochs=0",
        "train.init_backbone=null",
        f"train.output_dir={output_dir}",
        "train.seed=0",
        "eval.batch_size=16",
        *overrides,
    ]


def tiny_recipe(data_path: Path, output_dir: Path, *overrides: str, source: str = "disk"):
    return load_recipe("quickstart", tiny_overrides(data_path, output_dir, *overrides, source=source))


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights_of(folder: Path, name: str = ckpt.WEIGHTS_NAME) -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def disk_data(tmp_path_factory) -> Path:
    return make_disk_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the loop learns -------------------------------------------------------------------


def test_steps_on_a_fixed_batch_lower_the_loss_and_write_the_run(disk_data, tmp_path):
    # 8 training images = one batch: every epoch is one optimiser step on the same batch, and
    # an epoch's train_loss is the loss before its step
    run = tmp_path / "run"
    recipe = tiny_recipe(disk_data, run, *PLAIN_TRAINING, "data.train_limit=8", "train.epochs=10", "train.lr=2e-3")
    assert train(recipe) == run
    metrics = metrics_of(run)
    losses = [m["train_loss"] for m in metrics]
    assert [m["epoch"] for m in metrics] == [m["step"] for m in metrics] == list(range(1, 11))
    assert losses[-1] < 0.8 * losses[0], losses
    assert {"lr", "val_acc_stage1", "val_acc_stage2", "val_acc", "img_per_s"} <= metrics[0].keys()
    assert all(m["val_acc"] == m["val_acc_stage2"] for m in metrics)

    # the resolved recipe round-trips; last and best are complete checkpoints
    assert load_recipe(run / "recipe.yaml") == recipe
    last, best = run / "checkpoints" / "last", run / "checkpoints" / "best"
    assert ckpt.read_meta(last)["step"] == 10 and ckpt.read_meta(last)["epoch"] == 10
    best_meta = ckpt.read_meta(best)
    assert best_meta["best_val_acc"] == max(m["val_acc"] for m in metrics)
    assert metrics[best_meta["best_epoch"] - 1]["val_acc"] == best_meta["best_val_acc"]
    pipe = build_pipeline(recipe)
    load_checkpoint_weights(pipe, last)
    assert max_difference(pipe.state_dict(), weights_of(last)) == 0

    # a second run into the same folder must say how to continue it instead of overwriting it
    with pytest.raises(TrainingError, match="--resume auto"):
        train(recipe)


# -- resume ------------------------------------------------------------------------------


def test_resume_inside_an_epoch_reproduces_the_uninterrupted_run(disk_data, tmp_path):
    # DeiT augmentation (RandAugment, random erasing, mixup/cutmix, smoothing, repeated aug),
    # drop path and EMA all on; 3 steps per epoch; the whole-image phase ends after epoch 1
    common = [
        "data.train_limit=24",
        "train.epochs=3",
        "train.full_image_epochs=1",
        "train.warmup_epochs=1",
        "train.repeated_aug=2",
        "train.lr_base_batch=null",
        "train.lr=2e-3",
        "train.ema=true",
        "train.ema_decay=0.9",
        "model.backbone.drop_path_rate=0.2",
    ]
    straight = train(tiny_recipe(disk_data, tmp_path / "straight", *common), max_steps=7)
    resumed_recipe = tiny_recipe(disk_data, tmp_path / "resumed", *common)
    resumed = train(resumed_recipe, max_steps=2)
    stop = ckpt.read_meta(resumed / "checkpoints" / "last")
    assert (stop["epoch"], stop["epoch_step"], stop["step"]) == (0, 2, 2)
    at_stop = weights_of(resumed / "checkpoints" / "last")
    train(resumed_recipe, resume="auto", max_steps=7)

    a, b = straight / "checkpoints" / "last", resumed / "checkpoints" / "last"
    assert ckpt.read_meta(a)["step"] == ckpt.read_meta(b)["step"] == 7
    assert max_difference(weights_of(a), weights_of(b)) <= TRAINED["atol"]
    assert max_difference(weights_of(a, ckpt.EMA_WEIGHTS_NAME), weights_of(b, ckpt.EMA_WEIGHTS_NAME)) <= TRAINED["atol"]
    assert max_difference(weights_of(b), at_stop) > 1e-3  # the resumed steps did train
    timing = {"img_per_s", "epoch_time_s"}
    strip = [{k: v for k, v in m.items() if k not in timing} for m in metrics_of(straight)]
    # exact on the CPU; a GPU's atomics in the backward make the losses differ in the last bits
    expected = [{k: v for k, v in m.items() if k not in timing} for m in metrics_of(resumed)]
    assert strip == [{k: pytest.approx(v, rel=TRAINED["rtol"]) for k, v in m.items()} for m in expected]
    assert [m["whole_image_stage2"] for m in strip] == [True, False]


# -- two processes -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_hold_identical_weights_equal_to_one_process(disk_data, tmp_path):
    # same global batch (2 x 8 vs 1 x 16); RandAugment and random erasing stay on (each draw
    # carries its own seed), mixup and drop path are off (their streams are per process)
    common = ["data.train_limit=32", "train.epochs=1", "train.mixup=0.0", "train.cutmix=0.0", "train.repeated_aug=1"]
    common += ["train.warmup_epochs=0", "train.lr_base_batch=null", "train.lr=1e-3"]
    one = train(tiny_recipe(disk_data, tmp_path / "one", *common, "train.batch_size=16"))

    accelerate = shutil.which("accelerate")
    assert accelerate is not None, "the accelerate command line is part of the install"
    overrides = tiny_overrides(disk_data, tmp_path / "two", *common, "train.batch_size=8")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    command += ["-m", "dynvit.cli", "train", "quickstart", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    two = tmp_path / "two"
    meta = ckpt.read_meta(two / "checkpoints" / "last")
    assert meta["world_size"] == 2 and meta["global_batch"] == 16 and meta["step"] == 2
    digests = meta["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    trained = weights_of(two / "checkpoints" / "last")
    assert max_difference(trained, weights_of(one / "checkpoints" / "last")) <= TRAINED["atol"]
    torch.manual_seed(0)
    assert max_difference(trained, build_pipeline(load_recipe(two / "recipe.yaml")).state_dict()) > 1e-3
    assert metrics_of(two)[0]["val_acc"] == metrics_of(one)[0]["val_acc"]


# -- checkpoints ---------------------------------------------------------------------------


def _save(accelerator, model, target: Path, step: int) -> None:
    with torch.no_grad():
        model.weight.fill_(step)
    ckpt.save_training_checkpoint(accelerator, model, target, {"step": step})


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test may have set it up on a GPU
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    last = tmp_path / "checkpoints" / "last"
    _save(accelerator, model, last, 1)

    # killed while writing the weights of the next one
    def half_written(state_dict, path):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save_weights", half_written)
        with pytest.raises(KeyboardInterrupt):
            _save(accelerator, model, last, 2)
    assert ckpt.read_meta(last) == {"step": 1}
    assert torch.equal(weights_of(last)["weight"], torch.ones(2, 3))

    # the next write succeeds and clears the leftovers
    _save(accelerator, model, last, 3)
    assert ckpt.read_meta(last) == {"step": 3}
    assert sorted(p.name for p in last.parent.iterdir()) == ["last"]

    # killed between the two renames of the swap: the previous checkpoint is still found
    real_replace = os.replace
    calls = []

    def dies_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt.os, "replace", dies_on_second_rename)
        with pytest.raises(KeyboardInterrupt):
            _save(accelerator, model, last, 4)
    assert not last.exists()
    found = ckpt.resolve_checkpoint(tmp_path)
    assert found.name == ".last.old" and ckpt.read_meta(found) == {"step": 3}
    pipe_like = torch.nn.Linear(3, 2)
    ckpt.load_checkpoint_weights(pipe_like, tmp_path)
    assert torch.equal(pipe_like.weight, torch.full((2, 3), 3.0))
    _save(accelerator, model, last, 5)
    assert ckpt.read_meta(last) == {"step": 5}
    assert sorted(p.name for p in last.parent.iterdir()) == ["last"]


def test_nan_loss_stops_before_the_update_with_the_last_checkpoint_intact(disk_data, tmp_path, monkeypatch):
    steps = ["train.checkpoint_every_steps=2", "train.keep_step_checkpoints=true"]
    recipe = tiny_recipe(disk_data, tmp_path / "run", *PLAIN_TRAINING, *steps)
    calls = []
    compute_loss = DynamicPipeline.compute_loss

    def nan_on_third_step(self, output, target):
        calls.append(None)
        loss = compute_loss(self, output, target)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(DynamicPipeline, "compute_loss", nan_on_third_step)
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 1, step 3.*checkpoints/last"):
        train(recipe)
    last = tmp_path / "run" / "checkpoints" / "last"
    assert ckpt.read_meta(last)["step"] == 2
    assert all(torch.isfinite(w).all() for w in weights_of(last).values())
    kept = tmp_path / "run" / "checkpoints" / "step_2"
    assert ckpt.read_meta(kept)["step"] == 2 and max_difference(weights_of(kept), weights_of(last)) == 0


# -- bad input fails before training, naming the problem ---------------------------------


def test_an_image_size_the_recipe_cannot_patch(disk_data, tmp_path):
    # 36 px cuts into 4 px patches, but the 18 px stage-1 image does not
    with pytest.raises(RecipeError, match=r"18 px.*model.image_size=36.*multiple of the patch size 4"):
        train(tiny_recipe(disk_data, tmp_path / "run", "model.image_size=36"))
    assert not (tmp_path / "run").exists()


def test_init_backbone_starts_lfvit_from_a_baseline_run(disk_data, tmp_path):
    # the quickstart's warm start: a full-resolution run's backbone becomes LF-ViT's starting point
    limit = ["data.train_limit=8", "data.val_limit=8"]
    baseline = train(
        tiny_recipe(disk_data, tmp_path / "base", *limit, "model.stages=1", "loss.type=ce", "train.epochs=1")
    )
    frozen = ["train.lr=0", "train.warmup_lr=0", "train.min_lr=0", "train.epochs=1"]  # lr 0: the start is what is saved
    lfvit = train(tiny_recipe(disk_data, tmp_path / "lf", *limit, *frozen, f"train.init_backbone={baseline}"))
    start, base = weights_of(lfvit / "checkpoints" / "last"), weights_of(baseline / "checkpoints" / "best")
    backbone = [k for k in base if k.startswith("backbone.model.")]
    assert backbone and all(torch.equal(start[k], base[k]) for k in backbone)

    with pytest.raises(TrainingError, match=r"train.init_backbone=.*does not exist.*quickstart_baseline"):
        train(tiny_recipe(disk_data, tmp_path / "lf2", *limit, f"train.init_backbone={tmp_path / 'nowhere'}"))


def test_a_class_count_the_head_does_not_have(disk_data, tmp_path):
    with pytest.raises(DataError, match=r"4 classes.*set model.backbone.num_classes=4"):
        train(tiny_recipe(disk_data, tmp_path / "run", "model.backbone.num_classes=10"))


def test_bad_folders_fail_through_the_command_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / split / "a").mkdir(parents=True)
    mismatched = make_image_folder(tmp_path / "mismatched", {"train": ["a", "b", "c"], "val": ["a", "b", "d"]})
    cases = {
        empty: r"no images in the class folder\(s\) a",
        mismatched: r"only in train: c; only in validation: d",
        tmp_path / "missing": r"does not exist",
    }
    out = tmp_path / "out"
    for folder, message in cases.items():
        code = main(["train", "quickstart", "data.source=imagefolder", f"data.path={folder}", "--output-dir", str(out)])
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ")
        assert re.search(message, err), err
    assert not out.exists()


def test_every_parameter_gets_a_gradient_in_both_phases(disk_data, tmp_path):
    # DDP runs with find_unused_parameters=False unless the probe finds a parameter left out of a
    # step; the LF-ViT stages must use every one, with and without region selection
    from dynvit.training.trainer import unused_parameters

    pipe = build_pipeline(tiny_recipe(disk_data, tmp_path))
    assert unused_parameters(pipe, [True, False]) == []
    pipe.spare = torch.nn.Linear(2, 2)  # a stage that holds a parameter it never uses
    assert unused_parameters(pipe, [True]) == ["spare.bias", "spare.weight"]
    assert not pipe.whole_image_stage2 and all(p.grad is None for p in pipe.parameters())


def test_gradient_accumulation_equals_the_larger_batch(disk_data, tmp_path):
    # 2 micro-batches of 4 make one step of 8: same images (positions), same mean loss, same update
    common = [*PLAIN_TRAINING, "train.aa=rand-m9-mstd0.5-inc1", "train.clip_grad=0.5", "train.epochs=1"]
    big = train(tiny_recipe(disk_data, tmp_path / "big", *common, "train.batch_size=8"))
    accumulated = train(
        tiny_recipe(disk_data, tmp_path / "acc", *common, "train.batch_size=4", "train.grad_accum_steps=2")
    )
    assert ckpt.read_meta(accumulated / "checkpoints" / "last")["step"] == 4
    last = "checkpoints/last"
    assert max_difference(weights_of(big / last), weights_of(accumulated / last)) <= TRAINED["atol"]


def test_the_trainer_hands_its_progress_to_scheduled_plugins(disk_data, tmp_path, monkeypatch):
    from dynvit.plugins.token_reduction import EViT

    seen: list[float] = []
    original = EViT.set_training_progress
    monkeypatch.setattr(EViT, "set_training_progress", lambda self, e: (seen.append(e), original(self, e)))
    reduction = ["model.reduction.type=evit", "model.reduction.shrink_start_epoch=1", "model.reduction.shrink_epochs=1"]
    recipe = tiny_recipe(disk_data, tmp_path / "run", *PLAIN_TRAINING, *reduction, "data.train_limit=16")
    train(recipe)
    assert seen == [0.0, 0.5, 1.0, 1.5]  # 2 epochs of 2 steps: once before each batch, in epochs


def test_tensorboard_is_optional(disk_data, tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(TrainingError, match="pip install tensorboard"):
        train(tiny_recipe(disk_data, tmp_path / "run", "train.tensorboard=true"))
