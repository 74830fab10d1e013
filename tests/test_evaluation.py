"""Evaluation: the threshold sweep, calibration, records, throughput, and the report end to end."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_recipe, tolerance
from dynvit.plugins.exit_policies import ConfidenceExit, EntropyExit
from PIL import Image

from dynvit import build_pipeline
from dynvit.evaluation import (
    Curve,
    EvalConfig,
    Records,
    calibrate,
    choose_eta,
    collect_records,
    eta_grid,
    evaluate_pipeline,
    exit_decisions,
    format_table,
    measure_throughput,
    split_indices,
    sweep,
    topk_correct,
)
from dynvit.evaluation.runner import _paper_region
from dynvit.evaluation.throughput import _autocast, synchronizer
from dynvit.recipe import load_recipe

SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "metrics_schema.json"
S1, S2 = 1.1, 1.6  # GFLOPs of stage 1 and stage 2 for the synthetic records


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_records(n: int = 400, classes: int = 10, seed: int = 0) -> Records:
    """Logits whose confidences spread over (1/C, 1): per-image temperatures from sharp to flat."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1.3, n)[torch.randperm(n, generator=g)].unsqueeze(1)
    logits1 = torch.randn(n, classes, generator=g) * scale
    logits2 = torch.randn(n, classes, generator=g) * scale
    labels = torch.randint(0, classes, (n,), generator=g)
    # make the stages differ in quality so the curve is not flat
    logits2[torch.arange(n), labels] += 2.0
    return Records(logits=(logits1, logits2), labels=labels)


# -- the sweep -----------------------------------------------------------------------


def test_topk_correct_hand_computed():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, 1).tolist() == [True, False, False]
    assert topk_correct(logits, labels, 2).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="top-5 needs at least 5 classes"):
        topk_correct(logits, labels, 5)


def test_eta_grid_is_zero_to_one_in_steps():
    grid = eta_grid(0.01)
    assert len(grid) == 101 and grid[0] == 0 and grid[-1] == 1
    torch.testing.assert_close(grid[37], torch.tensor(0.37, dtype=torch.float64))
    with pytest.raises(ValueError, match="must divide 1"):
        eta_grid(0.03)


def test_curve_endpoints_are_the_stage_accuracies_and_cost_grows_with_eta():
    records = random_records()
    conf = records.probs(1).amax(-1)
    above = float(conf.max()) + 1e-3
    curve = sweep(records, S1, S2, torch.tensor([0.0, above], dtype=torch.float64))
    acc1, acc2 = (records.correct(s).double().mean().item() for s in (1, 2))
    top5_1, top5_2 = (records.correct(s, 5).double().mean().item() for s in (1, 2))
    assert acc1 != acc2  # otherwise the endpoints could not tell the stages apart
    assert curve.top1.tolist() == pytest.approx([acc1, acc2], abs=1e-12)
    assert curve.top5.tolist() == pytest.approx([top5_1, top5_2], abs=1e-12)
    assert curve.exit_fraction.tolist() == [1.0, 0.0]
    assert curve.gflops.tolist() == pytest.approx([S1, S1 + S2])

    full = sweep(records, S1, S2)  # the default grid, 0 .. 1
    assert len(full.eta) == 101
    assert (full.gflops.diff() >= 0).all() and (full.exit_fraction.diff() <= 0).all()
    assert full.gflops[-1] > full.gflops[0]  # the confidences spread, so the cost really moves
    assert full.top1[0] == pytest.approx(acc1)


def test_vectorised_sweep_equals_a_per_sample_reference_loop():
    records = random_records(n=300, classes=7, seed=3)
    etas = eta_grid(0.01)
    curve = sweep(records, S1, S2, etas)
    logits1, logits2 = records.logits
    for t, eta in enumerate(etas.tolist()):
        correct1 = correct5 = 0
        gflops = 0.0
        exited = 0
        for i in range(records.count):
            confidence = float(torch.softmax(logits1[i], dim=-1).max())
            stage_logits = logits1[i] if confidence >= eta else logits2[i]
            exited += confidence >= eta
            gflops += S1 + (0.0 if confidence >= eta else S2)
            ranking = sorted(range(7), key=lambda c, row=stage_logits: -float(row[c]))
            correct1 += ranking[0] == int(records.labels[i])
            correct5 += int(records.labels[i]) in ranking[:5]
        n = records.count
        assert curve.top1[t].item() == pytest.approx(correct1 / n, abs=1e-12), eta
        assert curve.top5[t].item() == pytest.approx(correct5 / n, abs=1e-12), eta
        assert curve.exit_fraction[t].item() == pytest.approx(exited / n, abs=1e-12), eta
        assert curve.gflops[t].item() == pytest.approx(gflops / n, rel=1e-9), eta


def test_policy_path_matches_the_broadcast_and_follows_other_policies():
    records = random_records(n=200)
    etas = eta_grid(0.05)
    broadcast = exit_decisions(records.logits[0], etas)
    assert torch.equal(exit_decisions(records.logits[0], etas, ConfidenceExit()), broadcast)
    entropy = exit_decisions(records.logits[0], etas, EntropyExit())
    assert not torch.equal(entropy, broadcast)
    for t, eta in enumerate(etas.tolist()):
        assert torch.equal(entropy[t], EntropyExit()(records.logits[0], eta))


def test_no_top5_below_five_classes():
    records = random_records(n=50, classes=3)
    assert sweep(records, S1, S2).top5 is None


def test_one_stage_records_cannot_be_swept():
    records = Records(logits=(torch.randn(4, 10),), labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="two-stage"):
        sweep(records, S1, S2)


# -- calibration -----------------------------------------------------------------------


def test_split_indices_are_disjoint_cover_everything_and_follow_the_seed():
    cal, held = split_indices(101, 0.3, seed=5)
    assert len(cal) == 30 and len(held) == 71
    assert set(cal.tolist()).isdisjoint(held.tolist())
    assert sorted(cal.tolist() + held.tolist()) == list(range(101))
    assert torch.equal(split_indices(101, 0.3, seed=5)[0], cal)
    assert not torch.equal(split_indices(101, 0.3, seed=6)[0], cal)
    assert [len(x) for x in split_indices(2, 0.01)] == [1, 1]
    with pytest.raises(ValueError, match="at least 2 images"):
        split_indices(1)


def test_choose_eta_hand_computed():
    three = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    curve = Curve(
        eta=three,
        top1=torch.tensor([0.5, 0.7, 0.6], dtype=torch.float64),
        top5=None,
        exit_fraction=torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64),
        gflops=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
        count=10,
    )
    assert choose_eta(curve, budget_gflops=3.0) == (1, True)  # the most accurate within budget
    assert choose_eta(curve, budget_gflops=1.5) == (0, True)
    assert choose_eta(curve, budget_gflops=0.5) == (0, False)  # nothing fits: the cheapest
    assert choose_eta(curve, target_acc=0.55) == (1, True)  # the cheapest that reaches it
    assert choose_eta(curve, target_acc=0.5) == (0, True)
    assert choose_eta(curve, target_acc=0.9) == (1, False)  # nothing reaches it: the most accurate
    with pytest.raises(ValueError, match="exactly one"):
        choose_eta(curve)


def test_calibration_stays_within_budget_on_the_calibration_split_and_reports_on_disjoint_images():
    records = random_records(n=300)
    chosen = set()
    for budget in np.linspace(S1 - 0.2, S1 + S2 + 0.1, 17).tolist():
        result = calibrate(records, S1, S2, budget_gflops=budget, fraction=0.4, seed=1)
        cal, held = result.calibration_index, result.heldout_index
        assert set(cal.tolist()).isdisjoint(held.tolist())
        assert len(cal) + len(held) == records.count
        assert result.calibration["count"] == len(cal) and result.heldout["count"] == len(held)
        on_cal = sweep(records.subset(cal), S1, S2)
        if budget >= S1:
            assert result.feasible
            assert result.calibration["gflops"] <= budget
            best = max(a for a, g in zip(on_cal.top1.tolist(), on_cal.gflops.tolist()) if g <= budget)
            assert result.calibration["top1"] == pytest.approx(best)
        else:
            assert not result.feasible and result.eta == 0.0
        # the held-out figure is the sweep of the held-out images alone, at the chosen eta
        on_held = sweep(records.subset(held), S1, S2, torch.tensor([result.eta], dtype=torch.float64))
        assert result.heldout["top1"] == pytest.approx(on_held.top1.item())
        assert result.heldout["gflops"] == pytest.approx(on_held.gflops.item())
        chosen.add(result.eta)
    assert len(chosen) > 3  # the budgets really steered the threshold


def test_calibration_for_an_accuracy_target_is_the_cheapest_that_reaches_it():
    records = random_records(n=300)
    for target in (0.2, 0.4, 0.6):
        result = calibrate(records, S1, S2, target_acc=target, seed=2)
        on_cal = sweep(records.subset(result.calibration_index), S1, S2)
        reaching = [g for a, g in zip(on_cal.top1.tolist(), on_cal.gflops.tolist()) if a >= target]
        if reaching:
            assert result.feasible and result.calibration["top1"] >= target
            assert result.calibration["gflops"] == pytest.approx(min(reaching))
        else:
            assert not result.feasible
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\]"):
        calibrate(records, S1, S2, target_acc=80)


def test_an_unreachable_goal_returns_the_closest_miss_and_says_so():
    records = random_records(n=200)
    result = calibrate(records, S1, S2, target_acc=1.0, seed=2)  # random logits never reach 100%
    on_cal = sweep(records.subset(result.calibration_index), S1, S2)
    assert not result.feasible and result.calibration["top1"] == pytest.approx(on_cal.top1.max().item())
    assert result.shortfall() == (
        f"no threshold meets top-1 1.0 on the calibration images; eta={result.eta:g} is the closest"
    )
    cheap = calibrate(records, S1, S2, budget_gflops=S1 / 2, seed=2)  # below what stage 1 alone costs
    assert not cheap.feasible and cheap.calibration["gflops"] == pytest.approx(on_cal.gflops.min().item())
    assert cheap.shortfall().startswith(f"no threshold meets {S1 / 2} GFLOPs")
    assert calibrate(records, S1, S2, budget_gflops=S1 + S2, seed=2).shortfall() is None


def test_without_a_goal_the_recipe_threshold_is_reported_on_both_parts():
    records = random_records(n=100)
    result = calibrate(records, S1, S2, default_eta=0.37)
    assert result.mode == "recipe" and result.eta == 0.37 and result.feasible
    assert result.heldout["eta"] == 0.37


# -- records, infer consistency, throughput ----------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return build_pipeline(tiny_recipe(), with_loss=False).eval()


def batches_of(images: torch.Tensor, labels: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images[i : i + size], labels[i : i + size]) for i in range(0, len(labels), size)]


def test_records_count_every_image_of_uneven_batches_in_order(pipe):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(21, 3, 64, 64, generator=g), torch.randint(0, 10, (21,), generator=g)
    records = collect_records(pipe, batches_of(images, labels, 8), keep_images=10, progress=False)
    assert records.count == 21 and torch.equal(records.labels, labels)
    assert records.images.shape == (10, 3, 64, 64) and torch.equal(records.images, images[:10])
    with torch.no_grad():
        whole = pipe(images)
    torch.testing.assert_close(records.logits[0], whole.logits[0], **tolerance())
    torch.testing.assert_close(records.logits[1], whole.logits[1], **tolerance())
    assert torch.equal(records.region, whole.selection.region)
    assert records.kept.shape == whole.selection.kept.shape
    with pytest.raises(ValueError, match="no images"):
        collect_records(pipe, [], progress=False)


def test_swept_predictions_equal_real_early_exit_inference(pipe):
    """What the sweep claims at eta is what pipe.infer (compacted stage 2) does at eta."""
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(16, 3, 64, 64, generator=g), torch.randint(0, 10, (16,), generator=g)
    records = collect_records(pipe, batches_of(images, labels, 16), progress=False)
    confidence = records.probs(1).amax(-1)
    etas = torch.quantile(confidence.double(), torch.tensor([0.0, 0.3, 0.7], dtype=torch.float64)) + 1e-6
    exits = exit_decisions(records.logits[0], etas, pipe.exit_policy)
    for t, eta in enumerate(etas.tolist()):
        result = pipe.infer(images, threshold=eta)
        assert torch.equal(result.exit_stage == 1, exits[t])
        swept = torch.where(exits[t], records.logits[0].argmax(-1), records.logits[1].argmax(-1))
        assert torch.equal(result.logits.argmax(-1), swept)
    assert 0 < exits[1].sum() < 16  # a threshold that really splits the batch


def test_throughput_times_both_paths(pipe):
    images = torch.randn(4, 3, 64, 64)
    result = measure_throughput(pipe, images, eta=0.0, repeats=2, warmup=1)
    assert result.exit_fraction == 1.0 and len(result.dynamic_seconds) == len(result.full_seconds) == 2
    assert result.dynamic_images_per_second > 0 and result.full_images_per_second > 0
    assert result.speedup == pytest.approx(result.dynamic_images_per_second / result.full_images_per_second)
    assert measure_throughput(pipe, images, eta=1.01, repeats=1, warmup=0).exit_fraction == 0.0
    assert measure_throughput(pipe, images, eta=0.5, repeats=1, warmup=0, amp=True).precision == "bfloat16"


def test_the_timer_synchronises_the_device_the_images_are_on(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronizer(torch.device("cuda", 1))()  # the current device may be cuda:0: it must not be the one waited for
    assert calls == [torch.device("cuda", 1)]
    synchronizer(torch.device("cpu"))()
    assert calls == [torch.device("cuda", 1)]


def test_amp_asks_the_images_device_whether_it_has_bfloat16(monkeypatch):
    # a machine whose cuda:0 has bfloat16 and whose cuda:1 (a pre-Ampere card) has not
    current = [0]

    @contextlib.contextmanager
    def on_device(device):
        saved, current[0] = current[0], torch.device(device).index
        yield
        current[0] = saved

    monkeypatch.setattr(torch.cuda, "device", on_device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: current[0] == 0)
    assert _autocast(torch.device("cuda", 1), True)[1] == "float16"
    assert _autocast(torch.device("cuda", 0), True)[1] == "bfloat16"
    assert _autocast(torch.device("cpu"), True)[1] == "bfloat16"
    assert current == [0]


# -- the report end to end ------------------------------------------------------------------


def _check(instance, schema, root, path="$"):
    """A small JSON Schema checker for the keywords docs/metrics_schema.json uses."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        _check(instance, target, root, path)
    if "oneOf" in schema:
        passing = 0
        for option in schema["oneOf"]:
            try:
                _check(instance, option, root, path)
                passing += 1
            except AssertionError:
                pass
        assert passing == 1, f"{path}: matches {passing} of the oneOf options"
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(
            (isinstance(instance, (int, float)) and not isinstance(instance, bool))
            if kind == "number"
            else (isinstance(instance, int) and not isinstance(instance, bool))
            if kind == "integer"
            else isinstance(instance, kinds[kind])
            for kind in allowed
        )
        assert ok, f"{path}: {instance!r} is not {allowed}"
    if "const" in schema:
        assert instance == schema["const"], f"{path}: {instance!r} != {schema['const']!r}"
    if "enum" in schema:
        assert instance in schema["enum"], f"{path}: {instance!r} not in {schema['enum']}"
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        assert math.isfinite(instance), path
        assert instance >= schema.get("minimum", -math.inf), f"{path}: {instance} below minimum"
        assert instance <= schema.get("maximum", math.inf), f"{path}: {instance} above maximum"
        assert instance > schema.get("exclusiveMinimum", -math.inf), f"{path}: {instance} too small"
        assert instance < schema.get("exclusiveMaximum", math.inf), f"{path}: {instance} too large"
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            assert key in instance, f"{path}: missing {key!r}"
        properties = schema.get("properties", {})
        for key, value in instance.items():
            if key in properties:
                _check(value, properties[key], root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                raise AssertionError(f"{path}: unexpected key {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                _check(value, schema["additionalProperties"], root, f"{path}.{key}")
    if isinstance(instance, list):
        assert len(instance) >= schema.get("minItems", 0), f"{path}: too few items"
        assert len(instance) <= schema.get("maxItems", math.inf), f"{path}: too many items"
        for i, item in enumerate(instance):
            if "items" in schema:
                _check(item, schema["items"], root, f"{path}[{i}]")


def validate_metrics(metrics: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    _check(metrics, schema, schema)
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(metrics)


def assert_real_png(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn on, not a blank canvas


def test_end_to_end_on_a_tiny_model_over_uneven_batches(pipe, tmp_path):
    g = torch.Generator().manual_seed(2)
    images, labels = torch.randn(37, 3, 64, 64, generator=g), torch.randint(0, 10, (37,), generator=g)
    settings = EvalConfig(batch_size=8, throughput_batch=8, throughput_repeats=2, throughput_warmup=1, region_images=4)
    flops = SimpleNamespace(stage1=0.01, stage2=0.02, full_resolution=0.04)
    info = {"recipe": "tiny", "split": "validation", "random_weights": True, "warnings": ["random weights"]}
    metrics = evaluate_pipeline(
        pipe,
        batches_of(images, labels, 8),
        tmp_path,
        flops,
        settings,
        budget_gflops=0.025,
        info=info,
        recipe=tiny_recipe(),
        progress=False,
    )
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    validate_metrics(metrics)
    assert metrics["data"]["count"] == 37 and metrics["curve"]["count"] == 37
    assert all(0 <= stage["top1"] <= 1 for stage in metrics["stages"])
    assert metrics["stages"][1]["gflops"] == pytest.approx(0.03)
    calibration = metrics["calibration"]
    assert calibration["mode"] == "budget" and calibration["calibration"]["gflops"] <= 0.025
    assert calibration["calibration"]["count"] + calibration["heldout"]["count"] == 37
    assert metrics["throughput"]["eta"] == calibration["eta"]
    assert_real_png(tmp_path / "curve.png", (700, 500))
    assert_real_png(tmp_path / "regions.png", (800, 480))
    assert (tmp_path / "recipe.yaml").is_file()
    table = format_table(metrics)
    assert "stage 1" in table and "held-out" in table and "img/s" in table and "WARNING: random weights" in table

    broken = json.loads(json.dumps(metrics))
    broken["stages"][0]["top1"] = 1.5
    with pytest.raises(Exception, match="maximum|1.5"):
        validate_metrics(broken)
    del broken["stages"][0]["top1"]
    with pytest.raises(Exception, match="top1"):
        validate_metrics(broken)


def test_a_one_stage_model_gets_its_accuracy_and_no_curve(tmp_path):
    torch.manual_seed(0)
    plain = build_pipeline(tiny_recipe("model.stages=1"), with_loss=False).eval()
    images, labels = torch.randn(9, 3, 64, 64), torch.arange(9)
    flops = SimpleNamespace(stage1=0.04, stage2=0.0, full_resolution=0.04)
    settings = EvalConfig(region_images=0)
    metrics = evaluate_pipeline(plain, batches_of(images, labels, 4), tmp_path, flops, settings, progress=False)
    validate_metrics(metrics)
    assert [s["gflops"] for s in metrics["stages"]] == [0.04] and metrics["data"]["count"] == 9
    assert metrics["curve"] is metrics["calibration"] is metrics["throughput"] is None
    assert metrics["files"]["curve"] is None and not (tmp_path / "curve.png").exists()
    assert "full resolution" in format_table(metrics)


def test_paper_points_are_drawn_only_for_the_papers_recipe():
    assert _paper_region(load_recipe("lfvit_deit_s")) == 5
    assert _paper_region(load_recipe("lfvit_deit_s", ["model.selector.region=6"])) == 6
    assert _paper_region(load_recipe("lfvit_star_deit_s")) is None  # 288 input: Table 3, not Table 2
    assert _paper_region(load_recipe("quickstart")) is None
    assert _paper_region(load_recipe("deit_s")) is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_records_and_throughput_on_cuda(pipe):
    cuda = build_pipeline(tiny_recipe(), with_loss=False).cuda().eval()
    cuda.load_state_dict(pipe.state_dict())
    images, labels = torch.randn(10, 3, 64, 64), torch.randint(0, 10, (10,))
    records = collect_records(cuda, batches_of(images, labels, 4), "cuda", progress=False)
    assert records.count == 10 and records.logits[0].device.type == "cpu"
    assert measure_throughput(cuda, images.cuda(), 0.5, repeats=2, warmup=1).device.startswith("cuda")


# -- through the data loader and the command line -----------------------------------------


@pytest.fixture(scope="module")
def disk_data(tmp_path_factory):
    """A tiny DatasetDict on disk: 12 train and 23 validation images, 10 classes (23 = 2 x 8 + 7)."""
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"class{i}" for i in range(10)])}
    )

    def split(n: int) -> datasets.Dataset:
        images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]
        return datasets.Dataset.from_dict({"image": images, "label": (np.arange(n) % 10).tolist()}, features)

    path = tmp_path_factory.mktemp("data") / "tiny"
    datasets.DatasetDict({"train": split(12), "validation": split(23)}).save_to_disk(str(path))
    return path


def data_overrides(path: Path) -> list[str]:
    return [
        "data.source=disk",
        f"data.path={path}",
        "data.num_workers=0",
        "eval.batch_size=8",
        "eval.throughput_batch=8",
        "eval.throughput_repeats=2",
        "eval.throughput_warmup=1",
        "eval.region_images=3",
    ]


def test_evaluate_counts_every_image_of_a_split_that_does_not_divide_into_batches(disk_data, tmp_path):
    from dynvit.evaluation import evaluate

    recipe = tiny_recipe(*data_overrides(disk_data))
    metrics = evaluate(recipe, None, tmp_path, device="cpu", budget_gflops=1.0, progress=False)
    validate_metrics(metrics)
    assert metrics["data"]["count"] == 23 and metrics["data"]["split"] == "validation"
    assert metrics["model"]["random_weights"] and any("RANDOMLY" in w for w in metrics["warnings"])
    assert metrics["flops"]["stage1"] > 0 and metrics["flops"]["stage2"] > 0
    assert metrics["stages"][1]["gflops"] == pytest.approx(metrics["flops"]["stage1"] + metrics["flops"]["stage2"])
    assert_real_png(tmp_path / "curve.png", (700, 500))
    assert_real_png(tmp_path / "regions.png", (600, 480))


def test_cli_eval_with_a_baseline_and_an_accuracy_target(disk_data, tmp_path, capsys):
    from conftest import TINY

    from dynvit.cli import main

    out = tmp_path / "eval"
    # overrides may come before and after the options
    argv = ["eval", "quickstart", *TINY, "--out", str(out), *data_overrides(disk_data), "--target-acc", "0.05"]
    argv += ["--device", "cpu", "--limit", "21", "--no-progress", "--baseline", "quickstart"]
    argv += [f"--baseline-override={o}" for o in [*TINY, "model.stages=1"]]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "RANDOMLY INITIALISED" in captured.err
    assert "baseline quickstart" in captured.out and "held-out" in captured.out
    metrics = json.loads((out / "metrics.json").read_text())
    validate_metrics(metrics)
    assert metrics["data"]["count"] == 21 and metrics["baseline"]["count"] == 21
    assert metrics["baseline"]["gflops"] > metrics["flops"]["stage1"]  # full resolution costs more than stage 1
    assert metrics["calibration"]["mode"] == "target"
    assert metrics["model"]["overrides"][: len(TINY)] == TINY

    assert main(["eval", "quickstart", "--target-acc", "80", "--device", "cpu", "--out", str(out)]) == 2
    assert "fraction in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "quickstart", "--target-acc", "0.8", "--budget-gflops", "1"])


# -- three stages: one threshold per exit, DVT's sweep --------------------------------------------------------

COSTS3 = [0.5, 1.0, 2.0]  # GFLOPs of each stage for the synthetic three-stage records


def random_records3(n: int = 300, classes: int = 7, seed: int = 0) -> Records:
    """Three stages of rising quality; scores are each stage's max softmax probability (ties included)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = []
    for boost in (0.5, 1.5, 3.0):
        scale = torch.logspace(-1, 1.3, n)[torch.randperm(n, generator=g)].unsqueeze(1)
        stage = torch.randn(n, classes, generator=g) * scale
        stage[torch.arange(n), labels] += boost
        logits.append(stage)
    scores = [x.softmax(-1).amax(-1) for x in logits[:2]]
    scores[1][:10] = scores[1][10]  # ties
    return Records(logits=tuple(logits), labels=labels, scores=tuple(scores))


def reference_thresholds(scores: list[list[float]], q: float) -> list[float]:
    """MSDNet/DVT's greedy rule, one image at a time (the hand-written reference)."""
    n, stages = len(scores[0]), len(scores) + 1
    weights = [q**k for k in range(stages)]
    proportions = [w / sum(weights) for w in weights]
    exited = [False] * n
    thresholds = []
    for k, row in enumerate(scores):
        wanted = math.floor(n * proportions[k])
        order = sorted((i for i in range(n) if not exited[i]), key=lambda i, row=row: -row[i])
        threshold = math.inf if wanted == 0 or not order else row[order[min(wanted, len(order)) - 1]]
        thresholds.append(threshold)
        for i in range(n):
            exited[i] = exited[i] or row[i] >= threshold
    return thresholds


def reference_point(records: Records, thresholds: list[float], costs: list[float]) -> tuple[float, float, list, float]:
    """(top-1, top-5, exit fractions, GFLOPs) by walking every image through the exits."""
    scores = [x.tolist() for x in records.scores]
    n, stages = records.count, records.num_stages
    top1 = top5 = gflops = 0.0
    exits = [0] * (stages - 1)
    for i in range(n):
        stage = next((k for k in range(stages - 1) if scores[k][i] >= thresholds[k]), stages - 1)
        if stage < stages - 1:
            exits[stage] += 1
        gflops += sum(costs[: stage + 1])
        row = records.logits[stage][i].tolist()
        ranking = sorted(range(len(row)), key=lambda c: -row[c])
        top1 += ranking[0] == int(records.labels[i])
        top5 += int(records.labels[i]) in ranking[:5]
    return top1 / n, top5 / n, [e / n for e in exits], gflops / n


def test_dvt_sweep_equals_a_per_sample_reference_loop():
    from dynvit.evaluation.curve import dvt_sweep, q_grid

    records = random_records3()
    scores = [x.tolist() for x in records.scores]
    curve = dvt_sweep(records, COSTS3)
    qs = q_grid()
    assert qs[0].item() == pytest.approx(0.05) and qs[-1].item() == pytest.approx(1.95) and len(qs) == 39
    for t, q in enumerate(qs.tolist()):
        thresholds = reference_thresholds(scores, q)
        assert curve.thresholds[t].tolist() == thresholds, q
        top1, top5, exits, gflops = reference_point(records, thresholds, COSTS3)
        assert curve.top1[t].item() == pytest.approx(top1, abs=1e-12), q
        assert curve.top5[t].item() == pytest.approx(top5, abs=1e-12), q
        assert curve.exit_fractions[t].tolist() == pytest.approx(exits, abs=1e-12), q
        assert curve.gflops[t].item() == pytest.approx(gflops, rel=1e-12), q
    # more weight on later stages costs more
    assert curve.gflops[-1] > curve.gflops[0] and curve.exit_fractions[0, 0] > curve.exit_fractions[-1, 0]


def test_staged_calibration_picks_thresholds_on_the_calibration_split_and_reports_on_the_rest():
    from dynvit.evaluation.calibration import calibrate_staged
    from dynvit.evaluation.curve import q_grid

    records = random_records3(n=301, seed=4)
    chosen = set()
    for budget in (0.4, 1.0, 1.5, 2.0, 2.6, 4.0):
        result = calibrate_staged(records, COSTS3, budget_gflops=budget, fraction=0.4, seed=1)
        cal, held = result.calibration_index, result.heldout_index
        assert set(cal.tolist()).isdisjoint(held.tolist()) and len(cal) + len(held) == records.count
        # by hand: every q's thresholds found on the calibration images alone, the best within budget chosen
        cal_records = records.subset(cal)
        scores = [x.tolist() for x in cal_records.scores]
        candidates = []
        for q in q_grid().tolist():
            thresholds = reference_thresholds(scores, q)
            top1, _, _, gflops = reference_point(cal_records, thresholds, COSTS3)
            candidates.append((q, thresholds, top1, gflops))
        within = [c for c in candidates if c[3] <= budget]
        if within:
            best = min(within, key=lambda c: (-c[2], c[3]))
            assert result.feasible
        else:
            best = min(candidates, key=lambda c: (c[3], -c[2]))
            assert not result.feasible
        assert result.q == pytest.approx(best[0]) and result.thresholds == best[1]
        assert result.calibration["top1"] == pytest.approx(best[2], abs=1e-12)
        assert result.calibration["gflops"] == pytest.approx(best[3], rel=1e-12)
        # the held-out figures: the same thresholds walked over the held-out images
        top1, top5, exits, gflops = reference_point(records.subset(held), best[1], COSTS3)
        assert result.heldout["count"] == len(held)
        assert result.heldout["top1"] == pytest.approx(top1, abs=1e-12)
        assert result.heldout["exit_fractions"] == pytest.approx(exits, abs=1e-12)
        assert result.heldout["gflops"] == pytest.approx(gflops, rel=1e-12)
        chosen.add(result.q)
    assert len(chosen) > 2  # the budgets really steered the thresholds

    target = calibrate_staged(records, COSTS3, target_acc=0.3, seed=2)
    assert target.mode == "target" and (not target.feasible or target.calibration["top1"] >= 0.3)
    recipe = calibrate_staged(records, COSTS3, default_thresholds=[0.6, 0.5])
    assert recipe.mode == "recipe" and recipe.q is None and recipe.thresholds == [0.6, 0.5]
    unreachable = calibrate_staged(records, COSTS3, target_acc=1.0, seed=2)
    assert unreachable.shortfall() == (
        f"no q of the sweep meets top-1 1.0 on the calibration images; q={unreachable.q:g} is the closest"
    )


@pytest.fixture(scope="module")
def pipe3():
    torch.manual_seed(0)
    return build_pipeline(load_recipe(Path(__file__).with_name("tiny_three_stages.yaml")), with_loss=False).eval()


def test_staged_predictions_equal_real_early_exit_inference(pipe3):
    """What the records claim at per-exit thresholds is what pipe.infer does with them."""
    from dynvit.evaluation.curve import dvt_sweep, exit_stages

    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(24, 3, 64, 64, generator=g), torch.randint(0, 10, (24,), generator=g)
    records = collect_records(pipe3, batches_of(images, labels, 10), progress=False)
    assert records.num_stages == 3 and len(records.scores) == 2
    curve = dvt_sweep(records, [1.0, 1.0, 1.0], torch.tensor([0.3, 1.0, 1.9], dtype=torch.float64))
    for row in curve.thresholds:
        stage = exit_stages(records.scores, row.unsqueeze(0))[0]
        result = pipe3.infer(images, threshold=row.tolist())
        assert torch.equal(result.exit_stage, stage)
        predicted = torch.stack([x.argmax(-1) for x in records.logits]).gather(0, (stage - 1).unsqueeze(0))[0]
        assert torch.equal(result.logits.argmax(-1), predicted)
    assert len(set(torch.cat([exit_stages(records.scores, curve.thresholds).flatten()]).tolist())) == 3


def test_evaluate_a_three_stage_recipe_end_to_end(disk_data, tmp_path):
    from dynvit.evaluation import evaluate

    recipe = load_recipe(Path(__file__).with_name("tiny_three_stages.yaml"), data_overrides(disk_data))
    metrics = evaluate(recipe, None, tmp_path, device="cpu", budget_gflops=0.003, progress=False)
    validate_metrics(metrics)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["model"]["stages"] == 3 and metrics["model"]["recipe_thresholds"] == [0.5, 0.5]
    assert metrics["model"]["grids"] == [[2, 2], [4, 4], [8, 8]] and metrics["model"]["tokens"] == [5, 17, 65]
    costs = metrics["flops"]["stages"]
    assert len(costs) == 3 and metrics["flops"]["stage2"] is None
    assert [s["gflops"] for s in metrics["stages"]] == pytest.approx([costs[0], sum(costs[:2]), sum(costs)])
    assert [s["stage"] for s in metrics["stages"]] == [1, 2, 3]
    assert metrics["curve"]["rule"] == "dvt" and len(metrics["curve"]["q"]) == 39
    assert all(len(t) == 2 for t in metrics["curve"]["thresholds"])
    calibration = metrics["calibration"]
    assert calibration["mode"] == "budget" and len(calibration["thresholds"]) == 2
    assert calibration["calibration"]["count"] + calibration["heldout"]["count"] == 23
    assert metrics["dynamic"]["thresholds"] == [0.5, 0.5] and len(metrics["dynamic"]["exit_fractions"]) == 2
    assert metrics["throughput"]["thresholds"] == calibration["thresholds"]
    assert_real_png(tmp_path / "curve.png", (700, 500))
    assert metrics["files"]["regions"] is None and not (tmp_path / "regions.png").exists()  # no refining stage
    table = format_table(metrics)
    assert "stage 3" in table and "held-out" in table and "thresholds" in table
