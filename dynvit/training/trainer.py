"""The training loop: any pipeline recipe, one process or many, through Hugging Face Accelerate.

``train(recipe)`` reads top to bottom like Accelerate's examples, as the named
steps of a :class:`TrainingRun` (in the manner of torchtune's recipe classes):
checks, model, data, optimiser and schedule from timm's parts,
``accelerator.prepare``, restore, then epochs of ``accumulate -> backward ->
clip -> step``, validation and a checkpoint. The same code runs on a laptop
CPU and under ``accelerate launch`` / ``torchrun`` on many GPUs (DDP, bf16).

What a resumed run restores: model, optimiser, scheduler, grad scaler, EMA,
every process's RNG streams, the epoch and the position inside it. The data
order and each image's augmentation come from ``(train.seed, epoch, position)``
(see :mod:`dynvit.data.loading`), so k steps + resume + m steps reproduce an
uninterrupted k + m step run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import gather_object, set_seed
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from tqdm.auto import tqdm

from dynvit.data.loading import build_dataloader, set_epoch, skipped_images, validate_data
from dynvit.errors import DynvitError
from dynvit.pipeline import DynamicPipeline, build_pipeline
from dynvit.recipe import recipe_to_yaml
from dynvit.training.checkpoint import (
    CheckpointNotFound,
    check_resumable,
    checkpoints_dir,
    copy_checkpoint,
    load_training_checkpoint,
    resolve_checkpoint,
    save_training_checkpoint,
    weights_digest,
)
from dynvit.training.config import MIXED_PRECISION
from dynvit.weights import atomic_write


class TrainingError(DynvitError, RuntimeError):
    """A run that cannot start or continue; the message names the problem and the fix."""


@dataclass
class Progress:
    """Where a run stands; saved in each checkpoint's meta.json."""

    epoch: int = 0  # the epoch in progress, 0-based (== epochs done when epoch_step == 0)
    epoch_step: int = 0  # optimiser steps done inside it
    step: int = 0  # optimiser steps done in all
    best_val_acc: float | None = None  # best last-stage validation accuracy, a fraction
    best_epoch: int | None = None
    epoch_loss_sum: float = 0.0  # train loss summed over the epoch's micro-batches so far
    epoch_loss_count: int = 0


# -- building blocks ---------------------------------------------------------------------


def init_backbone(pipe: DynamicPipeline, path: str) -> None:
    """Start from trained backbone weights (``train.init_backbone``)."""
    from dynvit.weights import CheckpointError, load_backbone_checkpoint

    if not Path(path).exists():
        raise TrainingError(
            f"train.init_backbone={path} does not exist; train the run that writes it first "
            "(the quickstart LF-ViT starts from `dynvit train quickstart_baseline`), "
            "or set train.init_backbone=null to start from random weights"
        )
    try:
        load_backbone_checkpoint(pipe.backbone, path)
    except (CheckpointError, CheckpointNotFound) as exc:
        raise TrainingError(f"train.init_backbone={path}: {exc}") from None


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters DeiT keeps out of weight decay: what each module's ``no_weight_decay()`` names,
    plus the per-stage position tables."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay") and callable(module.no_weight_decay):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    names |= {n for n, _ in model.named_parameters() if "stage_pos_embed" in n}
    return names


def unused_parameters(pipe: DynamicPipeline, phases: list[bool]) -> list[str]:
    """Trainable parameters that get no gradient in a training step of some phase.

    DDP must be told (``find_unused_parameters``) when there are any; the
    built-in LF-ViT stages use every parameter in both phases, but a
    plugin need not. Probed with one tiny batch on the CPU before training.
    """
    images = torch.randn(2, 3, pipe.image_size, pipe.image_size)
    labels = torch.zeros(2, dtype=torch.long)
    unused: set[str] = set()
    was_training, whole = pipe.training, pipe.whole_image_stage2
    pipe.train()
    for whole_image in phases:
        pipe.whole_image_stage2 = whole_image
        pipe.zero_grad(set_to_none=True)
        pipe.compute_loss(pipe(images), labels).backward()
        unused |= {n for n, p in pipe.named_parameters() if p.requires_grad and p.grad is None}
    pipe.zero_grad(set_to_none=True)
    pipe.train(was_training)
    pipe.whole_image_stage2 = whole
    return sorted(unused)


def scaled_lr(cfg: DictConfig, global_batch: int) -> float:
    """DeiT's linear scaling: ``lr`` is for ``lr_base_batch`` images per step."""
    return cfg.lr * global_batch / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr


def build_mixup(cfg: DictConfig, num_classes: int) -> Mixup | None:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    if cfg.batch_size % 2:
        raise TrainingError(f"mixup/cutmix need an even batch; train.batch_size={cfg.batch_size}")
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.smoothing,
        num_classes=num_classes,
    )


def make_accelerator(cfg: DictConfig, output_dir: Path) -> tuple[Accelerator, DistributedDataParallelKwargs]:
    if cfg.mixed_precision is not None and cfg.mixed_precision not in MIXED_PRECISION:
        raise TrainingError(f"train.mixed_precision={cfg.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
    log_with = None
    if cfg.tensorboard:
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise TrainingError("train.tensorboard=true needs TensorBoard: pip install tensorboard")
        log_with = "tensorboard"
    # decided after the model is built (see unused_parameters); read by accelerator.prepare
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        cpu=cfg.cpu or not _has_accelerator(),
        log_with=log_with,
        project_dir=str(output_dir),
        kwargs_handlers=[ddp],
    )
    return accelerator, ddp


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def _limit_cpu_threads(accelerator: Accelerator, num_workers: int) -> None:
    """On the CPU, leave the DataLoader workers their cores: oversubscribed math threads crawl.

    Only when the user has not chosen (OMP_NUM_THREADS); multi-process launchers set it themselves.
    """
    if accelerator.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(min(torch.get_num_threads(), max(1, cores // accelerator.num_processes - num_workers)))


def _resume_folder(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        try:
            found = resolve_checkpoint(output_dir)
        except CheckpointNotFound:
            return None
        raise TrainingError(
            f"{output_dir} already holds a run (checkpoint {found}); resume it with --resume auto "
            "or choose another train.output_dir"
        )
    if resume == "auto":
        try:
            return resolve_checkpoint(output_dir)
        except CheckpointNotFound:
            return None
    try:
        return resolve_checkpoint(resume)
    except CheckpointNotFound as exc:
        raise TrainingError(str(exc)) from None


def _write_text(path: Path, text: str) -> None:
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text))
    except OSError as exc:
        raise TrainingError(f"cannot write {path}: {exc.strerror or exc}; free some space or fix the folder") from None


def _check_writable(output_dir: Path) -> None:
    """Fail before any work when the run could not save anything (read-only or missing storage)."""
    probe = output_dir / f".write-test-{os.getpid()}"  # one per process: several may probe at once
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(
            f"train.output_dir={output_dir} is not writable ({exc.strerror or exc}); "
            "choose another folder with --output-dir"
        ) from None


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """On resume: forget epochs the resumed checkpoint had not reached yet."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= epochs_done]
    _write_text(path, "".join(f"{line}\n" for line in keep))


def _flat(config: DictConfig) -> dict[str, Any]:
    """A recipe as flat ``a.b.c: scalar`` pairs, for trackers' hyper-parameter tables."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            out[prefix] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(OmegaConf.to_container(config, resolve=True), "")
    return out


# -- validation ---------------------------------------------------------------------------


@torch.no_grad()
def evaluate_stages(accelerator: Accelerator, pipe: DynamicPipeline, loader: Any) -> list[float]:
    """Top-1 accuracy of each stage (training-mode forward, eval mode), over every process's shard.

    Stage 2 reads the selected region, as deployed, whatever the training phase.
    """
    was_training, whole = pipe.training, pipe.whole_image_stage2
    pipe.eval()
    pipe.whole_image_stage2 = False
    counts = torch.zeros(pipe.num_stages + 1, dtype=torch.long, device=accelerator.device)  # correct per stage, seen
    for images, labels in loader:
        images = images.to(accelerator.device, non_blocking=True)
        labels = labels.to(accelerator.device, non_blocking=True)
        for stage, logits in enumerate(pipe(images).logits):
            counts[stage] += (logits.argmax(dim=-1) == labels).sum()
        counts[-1] += labels.numel()
    counts = accelerator.gather_for_metrics(counts.unsqueeze(0)).sum(dim=0)
    pipe.train(was_training)
    pipe.whole_image_stage2 = whole
    seen = max(int(counts[-1]), 1)
    return [int(c) / seen for c in counts[:-1]]


def accuracy_metrics(accuracies: list[float]) -> dict[str, float]:
    metrics = {f"val_acc_stage{i + 1}": acc for i, acc in enumerate(accuracies)} if len(accuracies) > 1 else {}
    metrics["val_acc"] = accuracies[-1]
    return metrics


# -- the run ----------------------------------------------------------------------------------


def train(recipe: DictConfig, resume: str | None = None, max_steps: int | None = None) -> Path:
    """Train ``recipe``; returns its output folder.

    ``resume``: a checkpoint folder, a run's output folder, or ``"auto"`` (this
    recipe's output folder if it holds a checkpoint, else a fresh start).
    ``max_steps``: stop after this many optimiser steps in all (saving ``last``).
    """
    run = TrainingRun(recipe, max_steps)  # the accelerator
    run.check_inputs(resume)  # data, output folder, checkpoint to resume: before anything heavy
    run.build_model()
    run.build_data()
    run.build_optimisation()  # optimiser, schedule, mixup
    run.prepare()  # accelerator.prepare, EMA
    run.restore()  # fresh start or resume
    run.open_outputs()  # recipe.yaml, metrics.jsonl, trackers
    for epoch in range(run.progress.epoch, run.cfg.epochs):
        if run.reached_max_steps():
            break
        stats = run.train_epoch(epoch)
        if stats is None:  # stopped by max_steps inside the epoch; `last` is saved
            break
        metrics = run.validate(epoch, stats)
        improved = run.record(metrics)
        run.save_epoch_end(improved)
    run.accelerator.end_training()
    return run.output_dir


@dataclass
class EpochStats:
    """What a finished epoch of training leaves for its metrics."""

    train_loss: float  # mean over the epoch's micro-batches (resumed ones included)
    images_seen: int  # by all processes, in this run (not before a resume)
    elapsed: float  # seconds


class TrainingRun:
    """One ``train(recipe)``: the steps :func:`train` calls top to bottom, and the state they share.

    Set up in order by ``check_inputs``, ``build_model``, ``build_data``,
    ``build_optimisation``, ``prepare``, ``restore`` and ``open_outputs``; then
    each epoch is ``train_epoch``, ``validate``, ``record`` and ``save_epoch_end``.
    """

    # set by the setup steps, in this order
    classes: list[str]
    resume_from: Path | None
    pipe: DynamicPipeline  # the unwrapped pipeline (after ``prepare``)
    train_loader: Any
    val_loader: Any
    micro_batches: int  # micro-batches per epoch: whole optimiser steps only
    steps_per_epoch: int
    global_batch: int
    lr: float
    optimizer: Any
    scheduler: Any
    mixup: Mixup | None
    model: nn.Module  # what ``accelerator.prepare`` returned (DDP-wrapped on many processes)
    ema: ModelEmaV3 | None

    def __init__(self, recipe: DictConfig, max_steps: int | None = None) -> None:
        self.recipe, self.cfg, self.data = recipe, recipe.train, recipe.data
        self.max_steps = max_steps
        self.output_dir = Path(self.cfg.output_dir)
        self.ckpt_dir = checkpoints_dir(self.output_dir)
        self.metrics_file = self.output_dir / "metrics.jsonl"
        self.accelerator, self.ddp = make_accelerator(self.cfg, self.output_dir)
        self.accum = self.cfg.grad_accum_steps
        self.progress = Progress()
        self.probe: Tensor | None = None  # the latest training batch: a checkpoint is checked on it
        _limit_cpu_threads(self.accelerator, self.data.num_workers)

    # -- setup ------------------------------------------------------------------------------

    def check_inputs(self, resume: str | None) -> None:
        """Checks that fail before anything heavy runs: the data, the output folder, what to resume."""
        cfg = self.cfg
        with self.accelerator.local_main_process_first():  # data caches (quickstart, imagefolder) build once per node
            self.classes = validate_data(self.recipe)
        _check_writable(self.output_dir)
        self.resume_from = _resume_folder(resume, self.output_dir)
        if cfg.full_image_epochs >= cfg.epochs > 0:
            self.accelerator.print(
                f"note: train.full_image_epochs={cfg.full_image_epochs} >= train.epochs={cfg.epochs}: stage 2 sees "
                "the whole image throughout and region selection is never trained"
            )

    def build_model(self) -> None:
        """The pipeline, its starting weights; DDP is told about parameters a step can leave unused."""
        cfg, accelerator = self.cfg, self.accelerator
        set_seed(cfg.seed)
        pipe = build_pipeline(self.recipe, with_loss=True)
        if pipe.backbone.num_classes != len(self.classes):
            raise TrainingError(
                f"the data has {len(self.classes)} classes but the model's head has {pipe.backbone.num_classes}; "
                f"set model.backbone.num_classes={len(self.classes)}"
            )
        if self.resume_from is not None:
            check_resumable(pipe, self.resume_from)
        if cfg.init_backbone and self.resume_from is None:
            init_backbone(pipe, cfg.init_backbone)
        if accelerator.num_processes > 1 and pipe.num_stages == 2:
            phases = sorted({True, False} if 0 < cfg.full_image_epochs < cfg.epochs else {cfg.full_image_epochs > 0})
            unused = unused_parameters(pipe, phases)
            self.ddp.find_unused_parameters = bool(unused)
            if unused:
                accelerator.print(f"parameters without gradient in some steps (DDP will look for them): {unused[:5]}")
        self.pipe = pipe

    def build_data(self) -> None:
        """The loaders, a disjoint shard per process, and the epoch's length in optimiser steps."""
        accelerator, data, cfg, accum = self.accelerator, self.data, self.cfg, self.accum
        with accelerator.local_main_process_first():
            shard = {"num_replicas": accelerator.num_processes, "rank": accelerator.process_index}
            self.train_loader = build_dataloader(
                self.recipe, data.train_split, train=True, limit=data.train_limit, **shard
            )
            self.val_loader = build_dataloader(self.recipe, data.val_split, train=False, limit=data.val_limit, **shard)
        self.micro_batches = len(self.train_loader) // accum * accum  # whole optimiser steps per epoch
        self.steps_per_epoch = self.micro_batches // accum
        if self.steps_per_epoch == 0:
            raise TrainingError(
                f"one epoch has {len(self.train_loader.sampler)} training images per process, fewer than one "
                f"optimiser step of train.batch_size={cfg.batch_size} x train.grad_accum_steps={accum}; "
                "lower them or add data"
            )
        self.global_batch = cfg.batch_size * accelerator.num_processes * accum

    def build_optimisation(self) -> None:
        """Optimiser, schedule and mixup: timm's parts."""
        cfg = self.cfg
        self.lr = scaled_lr(cfg, self.global_batch)
        no_decay = no_weight_decay_names(self.pipe)
        self.optimizer = create_optimizer_v2(
            self.pipe,
            opt=cfg.opt,
            lr=self.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            eps=cfg.opt_eps,
            param_group_fn=lambda m: param_groups_weight_decay(m, cfg.weight_decay, no_weight_decay_list=no_decay),
        )
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched=cfg.sched,
            num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            cooldown_epochs=cfg.cooldown_epochs,
            step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch,
        )
        self.mixup = build_mixup(cfg, len(self.classes))

    def prepare(self) -> None:
        """``accelerator.prepare``, then the EMA of the prepared weights; both saved with each checkpoint."""
        accelerator = self.accelerator
        self.model, self.optimizer = accelerator.prepare(self.pipe, self.optimizer)
        self.pipe = accelerator.unwrap_model(self.model)
        self.ema = ModelEmaV3(self.pipe, decay=self.cfg.ema_decay) if self.cfg.ema else None
        accelerator.register_for_checkpointing(self.scheduler)
        if self.ema is not None:
            accelerator.register_for_checkpointing(self.ema)

    def restore(self) -> None:
        """A fresh start, or everything a checkpoint holds: weights, optimiser, schedule, RNG streams, position."""
        accelerator, resume_from = self.accelerator, self.resume_from
        self.progress = Progress()
        set_seed(self.cfg.seed, device_specific=True)  # each process its own dropout / mixup streams
        if resume_from is None:
            return
        meta = load_training_checkpoint(accelerator, resume_from)
        progress = self.progress = Progress(**{k: meta[k] for k in asdict(self.progress) if k in meta})
        if progress.epoch_step and (meta["global_batch"], meta["world_size"]) != (
            self.global_batch,
            accelerator.num_processes,
        ):
            raise TrainingError(
                f"{resume_from} stopped inside an epoch with {meta['world_size']} process(es) and a global batch of "
                f"{meta['global_batch']}; resume it with the same, or from a checkpoint at an epoch end"
            )
        self.scheduler.step_update(progress.step)
        accelerator.print(f"resumed from {resume_from}: epoch {progress.epoch + 1}, step {progress.step}")

    def open_outputs(self) -> None:
        """The output folder's recipe.yaml and metrics.jsonl (cut back to the resumed epoch), the trackers."""
        accelerator, cfg, recipe = self.accelerator, self.cfg, self.recipe
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _write_text(self.output_dir / "recipe.yaml", recipe_to_yaml(recipe))
            if self.resume_from is not None:
                _truncate_metrics(self.metrics_file, self.progress.epoch)
            elif self.metrics_file.exists():
                self.metrics_file.unlink()
        if cfg.tensorboard:
            accelerator.init_trackers("tensorboard", config=_flat(recipe))
        processes = accelerator.num_processes
        accelerator.print(
            f"training {recipe.model.backbone.get('arch')} ({self.pipe.num_stages} stage(s)) on {processes} "
            f"process(es), {accelerator.device}, mixed precision {accelerator.mixed_precision}: global batch "
            f"{self.global_batch} = {cfg.batch_size} x {processes} x {self.accum}, lr {self.lr:.3g}, "
            f"{self.steps_per_epoch} steps/epoch"
        )

    # -- one epoch ------------------------------------------------------------------------

    def reached_max_steps(self) -> bool:
        return self.max_steps is not None and self.progress.step >= self.max_steps

    def train_epoch(self, epoch: int) -> EpochStats | None:
        """The epoch's ``accumulate -> backward -> clip -> step``, from where a resumed run stopped.

        Returns None when ``max_steps`` stopped it inside the epoch (``last`` is
        saved then); else closes the epoch in ``progress`` and returns its stats.
        """
        accelerator, cfg, progress, model = self.accelerator, self.cfg, self.progress, self.model
        # LF-ViT's schedule: stage 2 sees the whole image for the first full_image_epochs epochs
        self.pipe.whole_image_stage2 = epoch < cfg.full_image_epochs
        model.train()
        set_epoch(self.train_loader, epoch)
        done = progress.epoch_step * self.accum  # micro-batches of this epoch already trained (resume)
        batches = accelerator.skip_first_batches(self.train_loader, done) if done else self.train_loader
        images_seen, start = 0, time.perf_counter()
        step_loss, micro_steps = torch.zeros((), device=accelerator.device), 0
        with self._progress_bar(epoch) as bar:
            for images, labels in islice(batches, self.micro_batches - done):
                self.pipe.set_training_progress(epoch + progress.epoch_step / self.steps_per_epoch)
                images, targets = self._inputs(images, labels)
                self.probe = images
                with accelerator.accumulate(model):
                    loss = self.pipe.compute_loss(model(images), targets)
                    accelerator.backward(loss)
                    step_loss = step_loss + loss.detach().float()  # stays on the device: no sync per micro-batch
                    micro_steps += 1
                    if accelerator.sync_gradients:
                        # one fused check and one host sync per optimiser step, before the update
                        loss_value = _checked_step(
                            accelerator, self.pipe, step_loss, micro_steps, epoch, progress, self.ckpt_dir
                        )
                        if cfg.clip_grad:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)

                images_seen += images.shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                rate = images_seen / max(time.perf_counter() - start, 1e-9)
                self._end_step(loss_value, micro_steps, rate, bar)
                step_loss, micro_steps = torch.zeros((), device=accelerator.device), 0
                if self.reached_max_steps():
                    break
        elapsed = time.perf_counter() - start
        if progress.epoch_step < self.steps_per_epoch:  # stopped by max_steps inside the epoch; `last` is saved
            accelerator.print(f"stopped after {progress.step} steps (--max-steps); resume with --resume auto")
            return None
        train_loss = progress.epoch_loss_sum / max(progress.epoch_loss_count, 1)
        progress.epoch, progress.epoch_step = epoch + 1, 0
        progress.epoch_loss_sum, progress.epoch_loss_count = 0.0, 0
        return EpochStats(train_loss=train_loss, images_seen=images_seen, elapsed=elapsed)

    def _progress_bar(self, epoch: int) -> tqdm:
        return tqdm(  # a context manager: closed on leaving, so an error's message starts on a line of its own
            total=self.steps_per_epoch,
            initial=self.progress.epoch_step,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            unit="step",
            disable=not self.accelerator.is_main_process,
            dynamic_ncols=True,
        )

    def _inputs(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """A batch on the device, with its training targets: mixed (mixup/cutmix), smoothed, or the labels."""
        images = images.to(self.accelerator.device, non_blocking=True)
        labels = labels.to(self.accelerator.device, non_blocking=True)
        if self.mixup is not None:
            return self.mixup(images, labels)
        if self.cfg.smoothing > 0:
            return images, mixup_target(labels, len(self.classes), smoothing=self.cfg.smoothing)
        return images, labels

    def _end_step(self, loss_value: float, micro_steps: int, rate: float, bar: tqdm) -> None:
        """After an optimiser step: progress, schedule, EMA, the bar, the tracker, a mid-epoch checkpoint."""
        accelerator, cfg, progress = self.accelerator, self.cfg, self.progress
        progress.epoch_loss_sum += loss_value * micro_steps
        progress.epoch_loss_count += micro_steps
        progress.step += 1
        progress.epoch_step += 1
        self.scheduler.step_update(num_updates=progress.step)
        if self.ema is not None:
            self.ema.update(self.pipe, step=progress.step)
        current_lr = self.optimizer.param_groups[0]["lr"]
        train_loss = progress.epoch_loss_sum / progress.epoch_loss_count
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{current_lr:.2e}", img_s=f"{rate:.0f}")
        bar.update()
        if cfg.tensorboard and progress.step % cfg.log_every_steps == 0:
            accelerator.log({"train/loss": loss_value, "train/lr": current_lr}, step=progress.step)
        if progress.epoch_step < self.steps_per_epoch and (self.reached_max_steps() or self._every_n(progress.step)):
            self.save_checkpoint()  # at the epoch's end `last` is saved after validation instead
            self._keep_step_checkpoint(progress.step)

    # -- validate, record, save -------------------------------------------------------------

    def validate(self, epoch: int, stats: EpochStats) -> dict[str, Any]:
        """The epoch's metrics: per-stage validation accuracy (and the EMA's), training loss, speed."""
        accelerator, progress = self.accelerator, self.progress
        accuracies = evaluate_stages(accelerator, self.pipe, self.val_loader)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": progress.step,
            "train_loss": stats.train_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            **accuracy_metrics(accuracies),
        }
        if self.ema is not None:
            metrics["val_acc_ema"] = evaluate_stages(accelerator, self.ema.module, self.val_loader)[-1]
        if self.data.skip_corrupt:  # unreadable images stood in for by the next readable one, over every process
            skipped = gather_object([skipped_images(self.train_loader)])
            metrics["skipped_images"] = len({p for ps in skipped for p in ps})
        metrics |= {
            "img_per_s": stats.images_seen / max(stats.elapsed, 1e-9),
            "epoch_time_s": stats.elapsed,
            "whole_image_stage2": self.pipe.whole_image_stage2,
        }
        return metrics

    def record(self, metrics: dict[str, Any]) -> bool:
        """Update the best accuracy, print, append to metrics.jsonl, log; True when the epoch is the best yet."""
        accelerator, progress = self.accelerator, self.progress
        improved = progress.best_val_acc is None or metrics["val_acc"] > progress.best_val_acc
        if improved:
            progress.best_val_acc, progress.best_epoch = metrics["val_acc"], metrics["epoch"]
        metrics["best_val_acc"] = progress.best_val_acc
        accelerator.print(
            f"epoch {metrics['epoch']}: train loss {metrics['train_loss']:.4f}, "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_acc"))
            + f", {metrics['img_per_s']:.0f} img/s (train, all processes), {metrics['epoch_time_s']:.1f} s"
        )
        if accelerator.is_main_process:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        if self.cfg.tensorboard:
            accelerator.log({f"val/{k}": v for k, v in metrics.items() if k.startswith("val_")}, step=progress.step)
        return improved

    def save_epoch_end(self, improved: bool) -> None:
        """``last`` (and ``step_N``, ``best`` where they apply), every process waiting for the copies."""
        self.save_checkpoint()
        self._keep_step_checkpoint(self.progress.step)
        if improved and self.accelerator.is_main_process:
            copy_checkpoint(self.ckpt_dir / "last", self.ckpt_dir / "best")
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> None:
        """Write ``last`` atomically, after checking the weights on the latest training batch."""
        accelerator = self.accelerator
        assert self.probe is not None, "a checkpoint is saved after a training batch"
        _check_outputs_finite(accelerator, self.pipe, self.ema, self.probe, self.progress, self.ckpt_dir)
        digests = gather_object([weights_digest(self.pipe)])
        if len(set(digests)) > 1:
            accelerator.print(f"WARNING: the processes hold different weights (SHA-256 per rank: {digests})")
        meta = {
            **asdict(self.progress),
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": accelerator.num_processes,
            "batch_size": self.cfg.batch_size,
            "grad_accum_steps": self.accum,
            "global_batch": self.global_batch,
            "weights_sha256_per_rank": digests,
        }
        save_training_checkpoint(accelerator, self.model, self.ckpt_dir / "last", meta, self.ema)

    def _every_n(self, step: int) -> bool:
        every = self.cfg.checkpoint_every_steps
        return bool(every) and step % every == 0

    def _keep_step_checkpoint(self, step: int) -> None:
        if self.cfg.keep_step_checkpoints and self._every_n(step) and self.accelerator.is_main_process:
            copy_checkpoint(self.ckpt_dir / "last", self.ckpt_dir / f"step_{step}")


def _last_good(ckpt_dir: Path) -> str:
    try:
        return f"the last good checkpoint is {resolve_checkpoint(ckpt_dir / 'last')}"
    except CheckpointNotFound:
        return "no checkpoint was written yet"


_ADVICE = "Lower train.lr, set train.clip_grad (e.g. 1.0), use bf16 instead of fp16, or check the data"


def _checked_step(
    accelerator: Accelerator,
    pipe: nn.Module,
    step_loss: Tensor,
    micro_steps: int,
    epoch: int,
    progress: Progress,
    ckpt_dir: Path,
) -> float:
    """The step's loss averaged over micro-batches and processes, after checking loss, gradients and weights.

    Every process stops together, before the update, when any of them is not
    finite. Under fp16 the grad scaler skips steps with overflowing gradients
    itself, so gradients are checked only without one. One all-reduce and one
    host sync per optimiser step; the norms are fused (``torch._foreach_norm``).
    """
    params = [p for p in pipe.parameters() if p.requires_grad]
    grads = [p.grad for p in params if p.grad is not None] if accelerator.scaler is None else []
    loss = step_loss / micro_steps
    health = torch.stack(
        [
            loss / accelerator.num_processes,
            (~torch.isfinite(loss)).float(),
            _not_finite(grads, loss),
            _not_finite(params, loss),
        ]
    )
    value, bad_loss, bad_grads, bad_params = accelerator.reduce(health, reduction="sum").tolist()
    if bad_loss or bad_grads or bad_params:
        what = (
            f"the loss is {value}"
            if bad_loss
            else "the gradients are not finite"
            if bad_grads
            else "the weights are not finite"
        )
        raise TrainingError(
            f"{what} at epoch {epoch + 1}, step {progress.step + 1}; training stopped before this update "
            f"and {_last_good(ckpt_dir)}. {_ADVICE}"
        )
    return value


def _not_finite(tensors: list[Tensor], like: Tensor) -> Tensor:
    """1.0 if any element of ``tensors`` is NaN or infinite (the max-norm propagates both), else 0.0."""
    if not tensors:
        return torch.zeros((), device=like.device)
    norms = torch.stack([n.float() for n in torch._foreach_norm([t.detach() for t in tensors], float("inf"))])
    return (~torch.isfinite(norms).all()).float().to(like.device)


@torch.no_grad()
def _check_outputs_finite(
    accelerator: Accelerator,
    pipe: DynamicPipeline,
    ema: nn.Module | None,
    probe: Tensor,
    progress: Progress,
    ckpt_dir: Path,
) -> None:
    """Refuse to save weights that are not finite or give non-finite outputs on this batch.

    Finite weights can still be poisoned (a huge learning rate drives them to
    1e6 and every output to NaN): a checkpoint is written only after it has
    produced finite logits for the batch it was trained on, so the one an
    error message calls good is.
    """
    was_training = pipe.training
    pipe.eval()
    try:
        with accelerator.autocast():
            logits = pipe(probe).logits
    finally:
        pipe.train(was_training)
    weights = [p for p in pipe.parameters()] + ([p for p in ema.module.parameters()] if ema is not None else [])
    bad_outputs = sum((~torch.isfinite(x.float())).any(dim=-1) for x in logits).bool().sum().float()
    health = torch.stack([bad_outputs, _not_finite(weights, bad_outputs)])
    bad_outputs, bad_weights = accelerator.reduce(health, reduction="sum").tolist()
    if bad_outputs or bad_weights:
        what = (
            "are not finite" if bad_weights else f"give non-finite logits for {int(bad_outputs)} of the batch's images"
        )
        raise TrainingError(
            f"after step {progress.step} the weights {what}; they were not saved and {_last_good(ckpt_dir)}. {_ADVICE}"
        )
