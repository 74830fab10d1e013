"""What ``dynvit eval`` runs: build, record once, derive every figure, write the report."""

from __future__ import annotations

import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from dynvit.evaluation.calibration import calibrate, calibrate_staged, split_indices
from dynvit.evaluation.config import EvalConfig
from dynvit.evaluation.curve import dvt_sweep, eta_grid, exit_decisions, exit_stages, q_grid, staged_points, sweep
from dynvit.evaluation.plots import MarkedPoint, denormalise, plot_curve, plot_regions, plot_staged_curve
from dynvit.evaluation.records import Records, collect_records
from dynvit.evaluation.report import (
    FLOPS_CONVENTION,
    SCHEMA_VERSION,
    UNITS,
    calibration_metrics,
    curve_metrics,
    throughput_metrics,
    write_metrics,
)
from dynvit.evaluation.throughput import measure_throughput
from dynvit.pipeline import DynamicPipeline, build_pipeline
from dynvit.recipe import load_recipe, recipe_to_yaml

RANDOM_WEIGHTS_WARNING = "no checkpoint given: these figures are for a RANDOMLY INITIALISED model"


class StageFlops(Protocol):
    """Per-image GFLOPs of a pipeline (``dynvit.flops.FlopsReport``: ``stages``, one per stage; an object with
    only the two-stage ``stage1`` and ``stage2`` serves a two-stage pipeline)."""

    full_resolution: float


def stage_costs(flops: StageFlops, num_stages: int) -> list[float]:
    """GFLOPs of each stage for an image that reaches it."""
    stages = getattr(flops, "stages", None)
    if stages is None:
        stages = [flops.stage1] if num_stages == 1 else [flops.stage1, flops.stage2]
    if len(stages) != num_stages:
        raise ValueError(f"the FLOPs count has {len(stages)} stages, the pipeline {num_stages}")
    return [float(x) for x in stages]


def recipe_thresholds(pipe: DynamicPipeline) -> list[float]:
    """Each exit policy's own threshold, in stage order."""
    values = []
    for index in range(pipe.num_stages - 1):
        policy = pipe.stages[index].exit_policy
        threshold = getattr(policy, "threshold", None)
        if threshold is None:
            raise ValueError(f"the exit policy of stage {index + 1} ({type(policy).__name__}) has no 'threshold'")
        values.append(float(threshold))
    return values


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available, else the CPU; a clear error for CUDA without a GPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


def _stage_metrics(pipe: DynamicPipeline, records: Records, flops: StageFlops) -> list[dict[str, Any]]:
    """Anytime accuracy: each stage's own prediction for every image."""
    top5 = records.num_classes >= 5
    if records.num_stages == 1:
        grid = pipe.grid2
        costs, names = stage_costs(flops, 1), [f"full resolution ({grid[0]}x{grid[1]} patches)"]
    else:
        per_stage = stage_costs(flops, pipe.num_stages)
        costs = [sum(per_stage[: k + 1]) for k in range(pipe.num_stages)]
        names = [
            f"stage {k + 1} ({pipe.stage_length(k)} tokens)"
            if pipe.stages[k].refines
            else f"stage {k + 1} ({pipe.grids[k][0]}x{pipe.grids[k][1]} patches)"
            for k in range(pipe.num_stages)
        ]
    return [
        {
            "stage": stage,
            "name": names[stage - 1],
            "top1": float(records.correct(stage, 1).double().mean()),
            "top5": float(records.correct(stage, 5).double().mean()) if top5 else None,
            "gflops": costs[stage - 1],
        }
        for stage in range(1, records.num_stages + 1)
    ]


def _threshold(pipe: DynamicPipeline) -> float:
    threshold = getattr(pipe.exit_policy, "threshold", None)
    if threshold is None:
        raise ValueError(f"exit policy {type(pipe.exit_policy).__name__} has no 'threshold'; it cannot be swept")
    return float(threshold)


def baseline_metrics(
    pipe: DynamicPipeline,
    batches: Iterable[tuple[Tensor, Tensor]] | Records,
    flops: StageFlops,
    device: torch.device,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 and cost of a baseline (from its batches, or records already collected); a two-stage one is
    scored at its recipe's threshold."""
    records = (
        batches
        if isinstance(batches, Records)
        else collect_records(pipe, batches, device, progress=progress, total=total, description="baseline")
    )
    result: dict[str, Any] = {"count": records.count, "eta": None, "exit_fraction": None}
    if records.num_stages == 1:
        result["top1"] = float(records.correct(1, 1).double().mean())
        result["top5"] = float(records.correct(1, 5).double().mean()) if records.num_classes >= 5 else None
        result["gflops"] = stage_costs(flops, 1)[0]
    elif records.num_stages > 2:
        rows = torch.tensor([recipe_thresholds(pipe)], dtype=torch.float64)
        point = staged_points(records, stage_costs(flops, records.num_stages), rows).point(0)
        result.update({k: point[k] for k in ("top1", "top5", "gflops")})
        result["exit_fraction"] = sum(point["exit_fractions"])  # stopped before the last stage
    else:
        eta = _threshold(pipe)
        grid = torch.tensor([eta], dtype=torch.float64)
        point = sweep(records, flops.stage1, flops.stage2, grid, policy=pipe.exit_policy).point(0)
        result.update({k: point[k] for k in ("eta", "top1", "top5", "exit_fraction", "gflops")})
    return result


def _paper_region(recipe: DictConfig | None) -> int | None:
    """The region size m when ``recipe`` is the paper's DeiT-S LF-ViT at 224 (Table 2 applies), else None."""
    if recipe is None:
        return None
    model = recipe.model
    if model.stages != 2:
        return None
    backbone, selector = model.backbone, model.selector
    plain_deit_s = backbone.get("arch") == "deit_small_patch16_224" and all(
        backbone.get(key) is None for key in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
    )
    if model.stages == 2 and model.image_size == 224 and plain_deit_s and selector.get("type") == "ngca":
        return int(selector.get("region", 5))
    return None


def _tile(images: Tensor, batch: int) -> Tensor:
    """``batch`` images from ``images``, repeated when there are fewer."""
    repeats = -(-batch // images.shape[0])
    return images.repeat(repeats, 1, 1, 1)[:batch]


def draw_regions(
    records: Records,
    pipe: DynamicPipeline,
    eta: float,
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    path: Path,
    per_group: int,
) -> Path:
    """``regions.png`` for the images kept in ``records``, split by whether they exit at ``eta``."""
    shown = records.images.shape[0]
    logits1, logits2 = (x[:shown] for x in records.logits)
    exits = exit_decisions(logits1, torch.tensor([eta], dtype=torch.float64), pipe.exit_policy)[0]
    return plot_regions(
        denormalise(records.images.float(), mean, std),
        records.region[:shown],
        records.kept[:shown],
        pipe.grid1,
        exits,
        records.labels[:shown],
        torch.where(exits, logits1.argmax(-1), logits2.argmax(-1)),
        logits1.softmax(-1).amax(-1),
        class_names,
        eta,
        path,
        per_group,
    )


def draw_staged_regions(
    records: Records,
    pipe: DynamicPipeline,
    thresholds: Sequence[float],
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    path: Path,
    per_group: int,
) -> Path:
    """``regions.png`` of a pipeline with several exits: the last refining stage's regions, the images split by
    whether they stop before it at ``thresholds``."""
    shown = records.images.shape[0]
    refining = max(k for k in range(pipe.num_stages) if pipe.stages[k].refines)  # 0-based; its grid is k - 1's
    scores = tuple(x[:shown] for x in records.exit_scores())
    stage = exit_stages(scores, torch.tensor([list(thresholds)], dtype=torch.float64))[0]  # (P,) 1-based
    predictions = torch.stack([x[:shown].argmax(-1) for x in records.logits]).gather(0, (stage - 1).unsqueeze(0))[0]
    return plot_regions(
        denormalise(records.images.float(), mean, std),
        records.region[:shown],
        records.kept[:shown],
        pipe.grids[refining - 1],
        stage <= refining,
        records.labels[:shown],
        predictions,
        records.logits[refining - 1][:shown].softmax(-1).amax(-1),
        class_names,
        float("nan"),
        path,
        per_group,
        groups=(f"stopped before stage {refining + 1}", f"reached stage {refining + 1}"),
    )


def _evaluate_staged(
    pipe: DynamicPipeline,
    records: Records,
    flops: StageFlops,
    settings: EvalConfig | DictConfig,
    budget_gflops: float | None,
    target_acc: float | None,
    warnings_: list[str],
) -> tuple[Any, dict[str, Any], Any, list[float], dict[str, Any]]:
    """Curve, recipe point, calibration, chosen thresholds and their point on all images, for three or more
    stages: one threshold per exit, swept by DVT's rule."""
    costs = stage_costs(flops, pipe.num_stages)
    own = recipe_thresholds(pipe)
    curve = dvt_sweep(records, costs, q_grid())
    dynamic = staged_points(records, costs, torch.tensor([own], dtype=torch.float64)).point(0)
    calibration = None
    if records.count >= 2:
        calibration = calibrate_staged(
            records,
            costs,
            budget_gflops=budget_gflops,
            target_acc=target_acc,
            default_thresholds=own,
            fraction=settings.calibration_fraction,
            seed=settings.calibration_seed,
        )
        if calibration.shortfall():
            warnings_.append(calibration.shortfall())
    else:
        warnings_.append("fewer than 2 images: no calibration split")
    thresholds = calibration.thresholds if calibration is not None else own
    chosen = staged_points(records, costs, torch.tensor([thresholds], dtype=torch.float64)).point(0)
    return curve, dynamic, calibration, thresholds, chosen


def evaluate_pipeline(
    pipe: DynamicPipeline,
    batches: Iterable[tuple[Tensor, Tensor]],
    out_dir: str | Path,
    flops: StageFlops,
    settings: EvalConfig | DictConfig | None = None,
    *,
    budget_gflops: float | None = None,
    target_acc: float | str | None = None,
    baseline: dict[str, Any] | None = None,
    baseline_correct: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    device: str | torch.device | None = None,
    info: dict[str, Any] | None = None,
    recipe: DictConfig | None = None,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any]:
    """Evaluate a built pipeline over ``(images, labels)`` batches; write metrics.json and the PNGs to ``out_dir``.

    ``info`` fills the descriptive fields of metrics.json (recipe name,
    checkpoint, split, ...); ``baseline`` is a :func:`baseline_metrics`
    result with ``recipe`` and ``checkpoint`` added, and ``baseline_correct``
    (N,) whether a one-stage baseline got each of the same images right: the
    calibration then reports the baseline on both parts, and ``target_acc=
    "baseline"`` calibrates to its top-1 on the calibration images.
    ``mean``/``std`` are the data's normalisation, to show the images as they were.
    """
    settings = settings if settings is not None else EvalConfig()
    info = dict(info or {})
    device = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    warnings_: list[str] = list(info.pop("warnings", []))
    two_stage = pipe.num_stages == 2
    staged = pipe.num_stages > 2  # one threshold per exit
    budget_gflops = settings.budget_gflops if budget_gflops is None else budget_gflops
    target_acc = settings.target_acc if target_acc is None else target_acc
    _check_goal(budget_gflops, target_acc)

    pipe.to(device)
    for key in ("batch_size", "throughput_batch", "throughput_repeats"):
        if getattr(settings, key) < 1:
            raise ValueError(f"eval.{key} must be at least 1, got {getattr(settings, key)}")
    # images kept for the pictures and the throughput batch (which repeats them when it is larger)
    pool = min(max(8 * settings.region_images, settings.throughput_batch, 1), 256)
    records = collect_records(pipe, batches, device, keep_images=pool, progress=progress, total=total)
    if baseline_correct is not None and len(baseline_correct) != records.count:
        raise ValueError(f"the baseline was scored on {len(baseline_correct)} images, the model on {records.count}")
    if target_acc == BASELINE_TARGET:
        if baseline_correct is None or records.count < 2:
            raise ValueError("target_acc='baseline' needs a one-stage baseline scored on the same images")
        on_cal, _ = split_indices(records.count, settings.calibration_fraction, settings.calibration_seed)
        target_acc = float(baseline_correct[on_cal].double().mean())
    names = list(class_names) if class_names is not None else [str(i) for i in range(records.num_classes)]
    if len(names) < records.num_classes:
        raise ValueError(f"{len(names)} class names for a model with {records.num_classes} classes")

    curve = calibration = throughput = dynamic = None
    stage_metrics = _stage_metrics(pipe, records, flops)
    files: dict[str, str | None] = {"metrics": "metrics.json", "curve": None, "regions": None, "recipe": None}
    title = f"{info.get('recipe', 'model')} on {info.get('split', 'data')} ({records.count} images)"
    if info.get("random_weights"):
        title += " - RANDOM WEIGHTS"
    marked_baseline = None
    if baseline is not None:
        marked_baseline = MarkedPoint(f"baseline {baseline.get('recipe', '')}", baseline["top1"], baseline["gflops"])

    def throughput_batch() -> torch.Tensor:
        return _tile(records.images, settings.throughput_batch).to(device)

    if two_stage:
        policy, recipe_eta = pipe.exit_policy, _threshold(pipe)
        curve = sweep(records, flops.stage1, flops.stage2, eta_grid(settings.eta_step), policy=policy)
        one = torch.tensor([recipe_eta], dtype=torch.float64)
        dynamic = sweep(records, flops.stage1, flops.stage2, one, policy=policy).point(0)
        if records.count >= 2:
            calibration = calibrate(
                records,
                flops.stage1,
                flops.stage2,
                budget_gflops=budget_gflops,
                target_acc=target_acc,
                default_eta=recipe_eta,
                fraction=settings.calibration_fraction,
                seed=settings.calibration_seed,
                etas=eta_grid(settings.eta_step),
                policy=policy,
            )
            if calibration.shortfall():
                warnings_.append(calibration.shortfall())
        else:
            warnings_.append("fewer than 2 images: no calibration split")
        eta = calibration.eta if calibration is not None else recipe_eta
        chosen_point = sweep(
            records, flops.stage1, flops.stage2, torch.tensor([eta], dtype=torch.float64), policy=policy
        ).point(0)
        how = calibration.mode if calibration is not None else "recipe"
        label = f"eta={eta:g} ({how}), all {records.count} images"
        if settings.throughput:
            throughput = measure_throughput(
                pipe, throughput_batch(), eta, settings.throughput_repeats, settings.throughput_warmup, settings.amp
            )
        chosen = MarkedPoint(label, chosen_point["top1"], chosen_point["gflops"])
        plot_curve(curve, out_dir / "curve.png", title, chosen, marked_baseline, _paper_region(recipe))
        files["curve"] = "curve.png"
        if settings.region_images > 0:
            draw_regions(records, pipe, eta, names, mean, std, out_dir / "regions.png", settings.region_images)
            files["regions"] = "regions.png"
    elif staged:
        curve, dynamic, calibration, thresholds, chosen_point = _evaluate_staged(
            pipe, records, flops, settings, budget_gflops, target_acc, warnings_
        )
        how = calibration.mode if calibration is not None else "recipe"
        shown = "/".join("none" if t is None else f"{t:.3g}" for t in chosen_point["thresholds"])
        label = f"thresholds {shown} ({how}), all {records.count} images"
        if settings.throughput:
            throughput = measure_throughput(
                pipe,
                throughput_batch(),
                thresholds,
                settings.throughput_repeats,
                settings.throughput_warmup,
                settings.amp,
            )
        stage_points = [MarkedPoint(f"stage {s['stage']} alone", s["top1"], s["gflops"]) for s in stage_metrics]
        chosen = MarkedPoint(label, chosen_point["top1"], chosen_point["gflops"])
        plot_staged_curve(curve, out_dir / "curve.png", title, stage_points, chosen, marked_baseline)
        files["curve"] = "curve.png"
        if settings.region_images > 0 and records.region is not None:  # only where a stage refines
            draw_staged_regions(
                records, pipe, thresholds, names, mean, std, out_dir / "regions.png", settings.region_images
            )
            files["regions"] = "regions.png"
    if recipe is not None:
        (out_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        files["recipe"] = "recipe.yaml"
    if records.count < 100:
        warnings_.append(f"only {records.count} images: accuracies are coarse (one image = {100 / records.count:.1f}%)")

    metrics: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "units": UNITS,
        "model": {
            "recipe": info.get("recipe", "model"),
            "overrides": list(info.get("overrides", [])),
            "checkpoint": info.get("checkpoint"),
            "random_weights": bool(info.get("random_weights", False)),
            "stages": pipe.num_stages,
            "image_size": pipe.image_size,
            "num_classes": records.num_classes,
            "exit_policy": type(pipe.exit_policy).__name__ if two_stage else None,
            "recipe_eta": _threshold(pipe) if two_stage else None,
            "stage1_grid": list(pipe.grid1) if pipe.num_stages > 1 else None,
            "stage2_grid": list(pipe.grid2),
            "stage2_tokens": pipe.stage2_length,
            "grids": [list(grid) for grid in pipe.grids],
            "tokens": [pipe.stage_length(k) for k in range(pipe.num_stages)],
            "exit_policies": [type(pipe.stages[k].exit_policy).__name__ for k in range(pipe.num_stages - 1)],
            "recipe_thresholds": recipe_thresholds(pipe),
        },
        "data": {
            "split": info.get("split"),
            "count": records.count,
            "batch_size": info.get("batch_size", settings.batch_size),
            "limit": info.get("limit"),
        },
        "device": str(device),
        "flops": {
            "unit": "GFLOPs per image",
            "convention": FLOPS_CONVENTION,
            "stage1": stage_costs(flops, pipe.num_stages)[0] if pipe.num_stages > 1 else None,
            "stage2": float(flops.stage2) if two_stage else None,
            "full_resolution": float(flops.full_resolution),
            "stages": stage_costs(flops, pipe.num_stages),
        },
        "stages": stage_metrics,
        "dynamic": dynamic,
        "curve": curve_metrics(curve),
        "calibration": calibration_metrics(calibration, baseline_correct),
        "baseline": baseline,
        "throughput": throughput_metrics(throughput),
        "files": files,
        "warnings": warnings_,
    }
    write_metrics(metrics, out_dir / "metrics.json")
    return metrics


def _build(recipe: DictConfig, checkpoint: str | None, device: torch.device) -> DynamicPipeline:
    from dynvit.weights import load_checkpoint_weights

    torch.manual_seed(int(recipe.train.seed))  # a model without a checkpoint is the same on every run
    pipe = build_pipeline(recipe, with_loss=False)
    if checkpoint is not None:
        load_checkpoint_weights(pipe, checkpoint)
    return pipe.to(device).eval()


BASELINE_TARGET = "baseline"  # target_acc: the one-stage baseline's top-1 on the same calibration images


def _check_goal(budget_gflops: float | None, target_acc: float | str | None) -> None:
    if budget_gflops is not None and target_acc is not None:
        raise ValueError("give either a FLOPs budget (--budget-gflops) or an accuracy target (--target-acc), not both")
    if isinstance(target_acc, str):
        if target_acc != BASELINE_TARGET:
            raise ValueError(f"--target-acc is a top-1 fraction or {BASELINE_TARGET!r}, got {target_acc!r}")
    elif target_acc is not None and not 0 <= target_acc <= 1:
        raise ValueError(f"--target-acc is a top-1 fraction in [0, 1] (0.8 for 80%), got {target_acc}")
    if budget_gflops is not None and budget_gflops <= 0:
        raise ValueError(f"--budget-gflops is GFLOPs per image and must be > 0, got {budget_gflops}")


def _baseline_recipe(
    baseline: str | Path | DictConfig, overrides: Sequence[str], recipe: DictConfig
) -> tuple[str, DictConfig]:
    """The baseline's recipe, reading the same data as ``recipe`` (its own image size and model)."""
    name = "baseline" if isinstance(baseline, DictConfig) else str(baseline)
    config = baseline if isinstance(baseline, DictConfig) else load_recipe(baseline, overrides)
    ours, theirs = recipe.model.backbone.get("num_classes"), config.model.backbone.get("num_classes")
    if ours != theirs:
        raise ValueError(
            f"the baseline {name} has {theirs} classes and the model {ours}; give the baseline "
            f"--baseline-override model.backbone.num_classes={ours} (or a recipe of its own)"
        )
    same_data = OmegaConf.create({"data": OmegaConf.to_container(recipe.data, resolve=True)})
    return name, typing.cast(DictConfig, OmegaConf.merge(config, same_data))


def evaluate(
    recipe: str | Path | DictConfig,
    checkpoint: str | None,
    out_dir: str | Path | None = None,
    baseline_recipe: str | Path | DictConfig | None = None,
    baseline_checkpoint: str | None = None,
    budget_gflops: float | None = None,
    target_acc: float | None = None,
    device: str | torch.device | None = None,
    limit: int | None = None,
    *,
    overrides: Sequence[str] = (),
    baseline_overrides: Sequence[str] = (),
    recipe_name: str | None = None,
    progress: bool = True,
    compile: bool = False,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (None: random weights) of ``recipe`` on its evaluation split; returns the metrics.

    Writes ``metrics.json``, ``curve.png``, ``regions.png`` and the resolved
    ``recipe.yaml`` to ``out_dir`` (default: the recipe's ``eval.output_dir``).
    ``overrides`` apply when ``recipe`` is a path or bundled name, and
    ``baseline_overrides`` to the baseline's; the baseline reads the same
    data as the model. Settings not passed here come from the recipe's
    ``eval`` section. ``compile`` times the throughput with both models under
    ``torch.compile`` (:meth:`DynamicPipeline.compile`); accuracy is the same.
    """
    from dynvit.data.loading import build_dataloader, class_names
    from dynvit.flops import count_flops

    if isinstance(recipe, DictConfig):
        name = recipe_name or "recipe"
    else:
        name = recipe_name or str(recipe)
        recipe = load_recipe(recipe, overrides)
    settings = recipe.eval
    budget_gflops = settings.budget_gflops if budget_gflops is None else budget_gflops
    target_acc = settings.target_acc if target_acc is None else target_acc
    _check_goal(budget_gflops, target_acc)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    device = resolve_device(device)
    split = settings.split or recipe.data.val_split
    out_dir = Path(out_dir if out_dir is not None else settings.output_dir)

    def loader_for(config: DictConfig) -> Any:
        return build_dataloader(config, split, train=False, batch_size=settings.batch_size, limit=limit)

    baseline_recipe = baseline_recipe if baseline_recipe is not None else settings.baseline_recipe
    baseline_checkpoint = baseline_checkpoint if baseline_checkpoint is not None else settings.baseline_checkpoint
    baseline_overrides = list(baseline_overrides) or list(settings.baseline_overrides)
    warnings_ = [] if checkpoint is not None else [RANDOM_WEIGHTS_WARNING]
    baseline = baseline_correct = None
    if baseline_recipe is not None:
        base_name, base_config = _baseline_recipe(baseline_recipe, baseline_overrides, recipe)
        base_pipe = _build(base_config, baseline_checkpoint, device)
        base_loader = loader_for(base_config)
        base_records = collect_records(
            base_pipe, base_loader, device, progress=progress, total=len(base_loader), description="baseline"
        )
        baseline = baseline_metrics(base_pipe, base_records, count_flops(base_pipe), device)
        baseline.update({"recipe": base_name, "checkpoint": baseline_checkpoint})
        if base_records.num_stages == 1:
            baseline_correct = base_records.correct(1, 1)
        if baseline_checkpoint is None:
            warnings_.append(f"no baseline checkpoint: the baseline {base_name} has RANDOM WEIGHTS")
        del base_pipe

    pipe = _build(recipe, checkpoint, device)
    names = class_names(recipe)
    if len(names) != pipe.backbone.num_classes:
        raise ValueError(
            f"the data has {len(names)} classes but the model's head has {pipe.backbone.num_classes}; "
            f"evaluate with the recipe the checkpoint was trained with, or set model.backbone.num_classes={len(names)}"
        )
    if compile and pipe.num_stages == 2:  # the compiled cascade has two stages
        pipe.compile()
    loader = loader_for(recipe)
    info = {
        "recipe": name,
        "overrides": list(overrides),
        "checkpoint": checkpoint,
        "random_weights": checkpoint is None,
        "split": split,
        "batch_size": settings.batch_size,
        "limit": limit,
        "warnings": warnings_,
    }
    return evaluate_pipeline(
        pipe,
        loader,
        out_dir,
        count_flops(pipe),
        settings,
        budget_gflops=budget_gflops,
        target_acc=target_acc,
        baseline=baseline,
        baseline_correct=baseline_correct,
        class_names=names,
        mean=tuple(recipe.data.mean),
        std=tuple(recipe.data.std),
        device=device,
        info=info,
        recipe=recipe,
        progress=progress,
        total=len(loader),
    )
