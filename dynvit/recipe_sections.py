"""The recipe's ``data``, ``train`` and ``eval`` sections: their fields, defaults and value checks.

Owned by the recipe layer (:func:`dynvit.recipe.recipe_schema` and the value
checks read them), so loading a recipe imports no engine: neither
:mod:`dynvit.training` nor :mod:`dynvit.evaluation`. Those packages re-export
what they read from here (``dynvit.training.config``, ``dynvit.evaluation.config``).

The ``data`` and ``train`` defaults are DeiT's (Touvron et al. 2021), which LF-ViT
follows "strictly": AdamW, lr 5e-4 per 512 images of global batch, weight decay
0.05, 5 warmup epochs, cosine decay to 1e-5, RandAugment, random erasing, mixup +
cutmix, label smoothing 0.1 and repeated augmentation. Recipes override what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynvit.recipe import ValueCheck, at_least, fraction, one_of, positive

MIXED_PRECISION = ("no", "bf16", "fp16")  # what train.mixed_precision (and Accelerate) accepts
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """Where images come from and how they are prepared."""

    # quickstart: the embedded data set (built and cached on first use);
    # imagefolder: `path` holds train/ and val/ with one folder per class (ImageNet layout);
    # disk: `path` is a DatasetDict written by `datasets.Dataset.save_to_disk`
    source: str = "quickstart"
    path: str | None = None
    cache_dir: str | None = None  # quickstart cache; None: its default (imagefolder data is scanned, not cached)
    train_split: str = "train"
    val_split: str = "validation"  # the imagefolder builder names the val/ folder "validation"
    image_column: str = "image"
    label_column: str = "label"
    num_workers: int = 2  # DataLoader worker processes per training process (decoding + augmentation)
    # an image that does not decode stops the run, naming file and split; true: the next readable image of the
    # split stands in for it, a warning names it (files are decoded lazily, so this is found mid-epoch)
    skip_corrupt: bool = False
    load_truncated: bool = False  # decode truncated image files, PIL filling the missing part with grey
    train_limit: int | None = None  # use only the first N training images (smoke tests)
    val_limit: int | None = None
    # evaluation preprocessing: resize to image_size / crop_pct, centre crop, normalise
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


@dataclass
class TrainConfig:
    """Optimisation settings; DeiT's defaults where the paper follows DeiT."""

    # -- length and batch ------------------------------------------------------
    epochs: int = 300
    full_image_epochs: int = 0  # LF-ViT: stage 2 sees the whole image for the first N epochs (230 of 350)
    batch_size: int = 64  # per process; global batch = batch_size x processes x grad_accum_steps
    grad_accum_steps: int = 1
    # backbone weights to start from: a timm/DeiT checkpoint, or a dynvit run / checkpoint folder whose
    # backbone is taken (how the quickstart LF-ViT starts from its trained baseline); not read on resume
    init_backbone: str | None = None
    # -- optimiser and schedule (timm.optim / timm.scheduler) ---------------------
    opt: str = "adamw"
    lr: float = 5e-4  # at a global batch of lr_base_batch; scaled linearly to the actual global batch
    lr_base_batch: int | None = 512  # None: use lr as given
    weight_decay: float = 0.05  # not applied to biases, norms, position tables and the CLS token
    opt_eps: float = 1e-8
    momentum: float = 0.9  # SGD-type optimisers only
    clip_grad: float | None = None  # max global gradient norm; None: no clipping
    sched: str = "cosine"
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 0
    # -- precision and devices ------------------------------------------------------
    mixed_precision: str | None = None  # no | bf16 | fp16; None: what `accelerate launch`/config says
    cpu: bool = False  # force the CPU even where a GPU is available
    # -- augmentation and regularisation (timm.data) ------------------------------
    aa: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment policy string; None: off
    color_jitter: float = 0.3  # unused while a RandAugment policy is set
    hflip: float = 0.5
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"
    recount: int = 1
    repeated_aug: int = 3  # DeiT's repeated augmentation: each image appears this many times per epoch
    mixup: float = 0.8  # mixup alpha; 0: off
    cutmix: float = 1.0  # cutmix alpha; 0: off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1  # label smoothing (folded into the mixup targets)
    ema: bool = False  # keep an exponential moving average of the weights (timm ModelEmaV3)
    ema_decay: float = 0.99996
    # -- bookkeeping -----------------------------------------------------------------
    seed: int = 0
    output_dir: str = "runs/default"
    checkpoint_every_steps: int = 0  # also save `last` every N optimiser steps; 0: at epoch ends only
    keep_step_checkpoints: bool = False  # keep each of those as checkpoints/step_N as well
    tensorboard: bool = False  # log through Accelerate's TensorBoard tracker (needs `pip install tensorboard`)
    log_every_steps: int = 50  # tracker logging interval


DATA_CHECKS: dict[str, ValueCheck] = {
    "source": one_of("quickstart", "imagefolder", "disk"),
    "num_workers": at_least(0),
    "train_limit": at_least(1),
    "val_limit": at_least(1),
    "crop_pct": fraction(open_low=True),
    "mean": (lambda v: len(v) == 3, "three values (R, G, B)"),
    "std": (lambda v: len(v) == 3 and all(x > 0 for x in v), "three positive values (R, G, B)"),
}

TRAIN_CHECKS: dict[str, ValueCheck] = {
    "epochs": at_least(1),
    "full_image_epochs": at_least(0),
    "batch_size": at_least(1),
    "grad_accum_steps": at_least(1),
    "lr": at_least(0),
    "lr_base_batch": at_least(1),
    "weight_decay": at_least(0),
    "opt_eps": positive(),
    "clip_grad": positive(),
    "warmup_epochs": at_least(0),
    "warmup_lr": at_least(0),
    "min_lr": at_least(0),
    "cooldown_epochs": at_least(0),
    "mixed_precision": one_of(*MIXED_PRECISION),
    "hflip": fraction(),
    "scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "two area fractions 0 < low <= high <= 1"),
    "reprob": fraction(),
    "recount": at_least(1),
    "repeated_aug": at_least(1),
    "mixup": at_least(0),
    "cutmix": at_least(0),
    "mixup_prob": fraction(),
    "mixup_switch_prob": fraction(),
    "smoothing": fraction(open_high=True),
    "ema_decay": fraction(open_high=True),
    "checkpoint_every_steps": at_least(0),
    "log_every_steps": at_least(1),
}


@dataclass
class EvalConfig:
    """How a checkpoint is evaluated (``dynvit eval``); every key can be overridden as ``eval.KEY=VALUE``."""

    batch_size: int = 128  # images per forward pass while recording both stages' outputs
    split: str | None = None  # data split to evaluate; None: the recipe's data.val_split
    output_dir: str = "runs/eval"  # where metrics.json and the pictures go unless --out is given
    # threshold sweep: eta = 0, step, 2 * step, ..., 1
    eta_step: float = 0.01
    # calibrated exits: eta chosen on a random `calibration_fraction` of the images, reported on the rest
    budget_gflops: float | None = None  # largest expected GFLOPs per image (fvcore convention)
    target_acc: float | None = None  # smallest top-1 accuracy, a fraction in [0, 1]
    calibration_fraction: float = 0.5
    calibration_seed: int = 0
    # a plain model evaluated on the same images (for example the bundled `deit_s`)
    baseline_recipe: str | None = None
    baseline_checkpoint: str | None = None
    baseline_overrides: list[str] = field(default_factory=list)  # key=value overrides of the baseline's recipe
    # throughput of pipe.infer at the chosen eta against the plain backbone with the same weights
    throughput: bool = True
    throughput_batch: int = 64
    throughput_repeats: int = 10
    throughput_warmup: int = 3
    amp: bool = False  # autocast while timing (bfloat16 on CPU and on GPUs that support it, else float16)
    # regions.png: images shown per group ("exited at stage 1", "needed stage 2"); 0: no picture
    region_images: int = 8


EVAL_CHECKS: dict[str, ValueCheck] = {
    "batch_size": at_least(1),
    "eta_step": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "budget_gflops": positive(),
    "target_acc": fraction(),
    "calibration_fraction": fraction(open_low=True, open_high=True),
    "throughput_batch": at_least(1),
    "throughput_repeats": at_least(1),
    "throughput_warmup": at_least(0),
    "region_images": at_least(0),
}
