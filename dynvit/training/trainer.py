"""The training loop: any pipeline recipe, one process or many, through Hugging Face Accelerate.

``train(recipe)`` reads top to bottom like Accelerate's examples: data, model,
optimiser and schedule from timm's parts, ``accelerator.prepare``, then epochs
of ``accumulate -> backward -> clip -> step``. The same code runs on a laptop
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
    cfg, data = recipe.train, recipe.data
    output_dir = Path(cfg.output_dir)
    accelerator, ddp = make_accelerator(cfg, output_dir)
    accum = cfg.grad_accum_steps
    _limit_cpu_threads(accelerator, data.num_workers)

    # -- checks that fail before anything heavy runs
    with accelerator.local_main_process_first():  # data caches (quickstart, imagefolder) build once per node
        classes = validate_data(recipe)
    _check_writable(output_dir)
    resume_from = _resume_folder(resume, output_dir)
    if cfg.full_image_epochs >= cfg.epochs > 0:
        accelerator.print(
            f"note: train.full_image_epochs={cfg.full_image_epochs} >= train.epochs={cfg.epochs}: stage 2 sees the "
            "whole image throughout and region selection is never trained"
        )

    # -- model; DDP is told about parameters a step can leave unused
    set_seed(cfg.seed)
    pipe = build_pipeline(recipe, with_loss=True)
    if pipe.backbone.num_classes != len(classes):
        raise TrainingError(
            f"the data has {len(classes)} classes but the model's head has {pipe.backbone.num_classes}; "
            f"set model.backbone.num_classes={len(classes)}"
        )
    if resume_from is not None:
        check_resumable(pipe, resume_from)
    if cfg.init_backbone and resume_from is None:
        init_backbone(pipe, cfg.init_backbone)
    if accelerator.num_processes > 1 and pipe.num_stages == 2:
        phases = sorted({True, False} if 0 < cfg.full_image_epochs < cfg.epochs else {cfg.full_image_epochs > 0})
        unused = unused_parameters(pipe, phases)
        ddp.find_unused_parameters = bool(unused)
        if unused:
            accelerator.print(f"parameters without gradient in some steps (DDP will look for them): {unused[:5]}")

    # -- data: a disjoint shard per process
    with accelerator.local_main_process_first():
        shard = {"num_replicas": accelerator.num_processes, "rank": accelerator.process_index}
        train_loader = build_dataloader(recipe, data.train_split, train=True, limit=data.train_limit, **shard)
        val_loader = build_dataloader(recipe, data.val_split, train=False, limit=data.val_limit, **shard)
    micro_batches = len(train_loader) // accum * accum  # whole optimiser steps per epoch
    steps_per_epoch = micro_batches // accum
    if steps_per_epoch == 0:
        raise TrainingError(
            f"one epoch has {len(train_loader.sampler)} training images per process, fewer than one optimiser step "
            f"of train.batch_size={cfg.batch_size} x train.grad_accum_steps={accum}; lower them or add data"
        )
    global_batch = cfg.batch_size * accelerator.num_processes * accum

    # -- optimiser, schedule, mixup, EMA: timm's parts
    lr = scaled_lr(cfg, global_batch)
    no_decay = no_weight_decay_names(pipe)
    optimizer = create_optimizer_v2(
        pipe,
        opt=cfg.opt,
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        eps=cfg.opt_eps,
        param_group_fn=lambda m: param_groups_weight_decay(m, cfg.weight_decay, no_weight_decay_list=no_decay),
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        cooldown_epochs=cfg.cooldown_epochs,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    mixup = build_mixup(cfg, len(classes))

    model, optimizer = accelerator.prepare(pipe, optimizer)
    pipe = accelerator.unwrap_model(model)
    ema = ModelEmaV3(pipe, decay=cfg.ema_decay) if cfg.ema else None
    accelerator.register_for_checkpointing(scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # -- fresh start or resume
    progress = Progress()
    set_seed(cfg.seed, device_specific=True)  # each process its own dropout / mixup streams
    if resume_from is not None:
        meta = load_training_checkpoint(accelerator, resume_from)
        progress = Progress(**{k: meta[k] for k in asdict(progress) if k in meta})
        if progress.epoch_step and (meta["global_batch"], meta["world_size"]) != (
            global_batch,
            accelerator.num_processes,
        ):
            raise TrainingError(
                f"{resume_from} stopped inside an epoch with {meta['world_size']} process(es) and a global batch of "
                f"{meta['global_batch']}; resume it with the same, or from a checkpoint at an epoch end"
            )
        scheduler.step_update(progress.step)
        accelerator.print(f"resumed from {resume_from}: epoch {progress.epoch + 1}, step {progress.step}")

    metrics_file = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_text(output_dir / "recipe.yaml", recipe_to_yaml(recipe))
        if resume_from is not None:
            _truncate_metrics(metrics_file, progress.epoch)
        elif metrics_file.exists():
            metrics_file.unlink()
    if cfg.tensorboard:
        accelerator.init_trackers("tensorboard", config=_flat(recipe))
    accelerator.print(
        f"training {recipe.model.backbone.get('arch')} ({pipe.num_stages} stage(s)) on {accelerator.num_processes} "
        f"process(es), {accelerator.device}, mixed precision {accelerator.mixed_precision}: global batch {global_batch}"
        f" = {cfg.batch_size} x {accelerator.num_processes} x {accum}, lr {lr:.3g}, {steps_per_epoch} steps/epoch"
    )

    def save(target: Path, probe: Tensor) -> None:
        _check_outputs_finite(accelerator, pipe, ema, probe, progress, ckpt_dir)
        digests = gather_object([weights_digest(pipe)])
        if len(set(digests)) > 1:
            accelerator.print(f"WARNING: the processes hold different weights (SHA-256 per rank: {digests})")
        meta = {
            **asdict(progress),
            "steps_per_epoch": steps_per_epoch,
            "world_size": accelerator.num_processes,
            "batch_size": cfg.batch_size,
            "grad_accum_steps": accum,
            "global_batch": global_batch,
            "weights_sha256_per_rank": digests,
        }
        save_training_checkpoint(accelerator, model, target, meta, ema)

    ckpt_dir = checkpoints_dir(output_dir)

    def every_n_steps(step: int) -> bool:
        return bool(cfg.checkpoint_every_steps) and step % cfg.checkpoint_every_steps == 0

    def keep_step_checkpoint(step: int) -> None:
        if cfg.keep_step_checkpoints and every_n_steps(step) and accelerator.is_main_process:
            copy_checkpoint(ckpt_dir / "last", ckpt_dir / f"step_{step}")

    for epoch in range(progress.epoch, cfg.epochs):
        if max_steps is not None and progress.step >= max_steps:
            break
        # LF-ViT's schedule: stage 2 sees the whole image for the first full_image_epochs epochs
        pipe.whole_image_stage2 = epoch < cfg.full_image_epochs
        model.train()
        set_epoch(train_loader, epoch)
        done = progress.epoch_step * accum  # micro-batches of this epoch already trained (resume)
        batches = accelerator.skip_first_batches(train_loader, done) if done else train_loader
        images_seen, start = 0, time.perf_counter()
        step_loss, micro_steps = torch.zeros((), device=accelerator.device), 0
        with tqdm(  # closed on leaving, so an error's message starts on a line of its own
            total=steps_per_epoch,
            initial=progress.epoch_step,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            disable=not accelerator.is_main_process,
            dynamic_ncols=True,
        ) as bar:
            for images, labels in islice(batches, micro_batches - done):
                images = images.to(accelerator.device, non_blocking=True)
                labels = labels.to(accelerator.device, non_blocking=True)
                if mixup is not None:
                    images, targets = mixup(images, labels)
                elif cfg.smoothing > 0:
                    targets = mixup_target(labels, len(classes), smoothing=cfg.smoothing)
                else:
                    targets = labels

                with accelerator.accumulate(model):
                    loss = pipe.compute_loss(model(images), targets)
                    accelerator.backward(loss)
                    step_loss = step_loss + loss.detach().float()  # stays on the device: no sync per micro-batch
                    micro_steps += 1
                    if accelerator.sync_gradients:
                        # one fused check and one host sync per optimiser step, before the update
                        loss_value = _checked_step(accelerator, pipe, step_loss, micro_steps, epoch, progress, ckpt_dir)
                        if cfg.clip_grad:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                images_seen += images.shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                progress.epoch_loss_sum += loss_value * micro_steps
                progress.epoch_loss_count += micro_steps
                step_loss, micro_steps = torch.zeros((), device=accelerator.device), 0
                progress.step += 1
                progress.epoch_step += 1
                scheduler.step_update(num_updates=progress.step)
                if ema is not None:
                    ema.update(pipe, step=progress.step)
                current_lr = optimizer.param_groups[0]["lr"]
                rate = images_seen / max(time.perf_counter() - start, 1e-9)
                train_loss = progress.epoch_loss_sum / progress.epoch_loss_count
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{current_lr:.2e}", img_s=f"{rate:.0f}")
                bar.update()
                if cfg.tensorboard and progress.step % cfg.log_every_steps == 0:
                    accelerator.log({"train/loss": loss_value, "train/lr": current_lr}, step=progress.step)
                stop = max_steps is not None and progress.step >= max_steps
                if progress.epoch_step < steps_per_epoch and (stop or every_n_steps(progress.step)):
                    save(ckpt_dir / "last", images)  # at the epoch's end `last` is saved after validation instead
                    keep_step_checkpoint(progress.step)
                if stop:
                    break
        elapsed = time.perf_counter() - start
        if progress.epoch_step < steps_per_epoch:  # stopped by max_steps inside the epoch; `last` is saved
            accelerator.print(f"stopped after {progress.step} steps (--max-steps); resume with --resume auto")
            break

        # -- end of epoch: validate, log, checkpoint
        train_loss = progress.epoch_loss_sum / max(progress.epoch_loss_count, 1)
        progress.epoch, progress.epoch_step = epoch + 1, 0
        progress.epoch_loss_sum, progress.epoch_loss_count = 0.0, 0
        accuracies = evaluate_stages(accelerator, pipe, val_loader)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": progress.step,
            "train_loss": train_loss,
            "lr": optimizer.param_groups[0]["lr"],
            **accuracy_metrics(accuracies),
        }
        if ema is not None:
            metrics["val_acc_ema"] = evaluate_stages(accelerator, ema.module, val_loader)[-1]
        if data.skip_corrupt:  # unreadable images stood in for by the next readable one, over every process
            metrics["skipped_images"] = len({p for ps in gather_object([skipped_images(train_loader)]) for p in ps})
        metrics |= {
            "img_per_s": images_seen / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
            "whole_image_stage2": pipe.whole_image_stage2,
        }
        improved = progress.best_val_acc is None or metrics["val_acc"] > progress.best_val_acc
        if improved:
            progress.best_val_acc, progress.best_epoch = metrics["val_acc"], epoch + 1
        metrics["best_val_acc"] = progress.best_val_acc
        accelerator.print(
            f"epoch {epoch + 1}: train loss {metrics['train_loss']:.4f}, "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_acc"))
            + f", {metrics['img_per_s']:.0f} img/s (train, all processes), {elapsed:.1f} s"
        )
        if accelerator.is_main_process:
            with metrics_file.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        if cfg.tensorboard:
            accelerator.log({f"val/{k}": v for k, v in metrics.items() if k.startswith("val_")}, step=progress.step)
        save(ckpt_dir / "last", images)
        keep_step_checkpoint(progress.step)
        if improved and accelerator.is_main_process:
            copy_checkpoint(ckpt_dir / "last", ckpt_dir / "best")
        accelerator.wait_for_everyone()

    accelerator.end_training()
    return output_dir


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
