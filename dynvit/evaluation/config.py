"""Recipe schema of the ``eval`` section."""

from __future__ import annotations

from dataclasses import dataclass, field

from dynvit.recipe import ValueCheck, at_least, fraction, positive


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
