"""A shortened ``dynvit quickstart``: data, both trainings, both evaluations, the summary."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dynvit.cli import main

TINY = [
    "model.backbone.depth=2",
    "model.backbone.embed_dim=32",
    "model.backbone.num_heads=2",
    "model.selector.first_block=1",
]
SMALL_DATA = ["data.train_limit=64", "data.val_limit=32", "data.num_workers=0"]


def test_shortened_quickstart_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    code = main(
        ["quickstart", "--out", str(out), "--max-steps", "2", "--limit", "48", "--device", "cpu", *TINY, *SMALL_DATA]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "dynvit quickstart: LF-ViT vs its full-resolution baseline" in printed
    assert "LF-ViT at calibrated eta=" in printed and "of the baseline's" in printed

    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["data"]["split"] == "test" and metrics["data"]["count"] == 48
    stage1, stage2 = metrics["stages"]
    baseline = metrics["baseline"]
    # stage 1 is cheaper than the focused stage, which is cheaper than the full-resolution baseline
    assert stage1["gflops"] < stage2["gflops"] < baseline["gflops"]
    calibration = metrics["calibration"]
    assert calibration["mode"] == "target"
    held = calibration["heldout"]
    assert calibration["calibration"]["count"] + held["count"] == 48
    # the target is the baseline's top-1 on the calibration images; both halves average to its top-1 on all 48
    on_same = calibration["baseline_top1"]
    assert calibration["target_acc"] == on_same["calibration"]
    average = (on_same["calibration"] * 24 + on_same["heldout"] * 24) / 48
    assert average == pytest.approx(baseline["top1"], abs=1e-9)
    assert "held-out half (24 test images" in printed
    assert stage1["gflops"] - 1e-9 <= held["gflops"] <= stage2["gflops"] + 1e-9
    for name in ("curve.png", "regions.png"):
        with Image.open(out / "eval" / name) as image:
            assert image.width > 100 and image.height > 100
    # both runs left resumable checkpoints
    for run in ("lfvit", "baseline"):
        assert (out / run / "checkpoints" / "last" / "model.safetensors").is_file()


@pytest.mark.slow
def test_full_quickstart_shows_the_method_working(tmp_path, monkeypatch):
    # the whole default quickstart (about 3 minutes on 2 CPU cores): what the README promises, with margins
    # for other CPUs' arithmetic (measured: stage 1 75.1%, stage 2 89.1%, baseline 83.9% (83.4% on the
    # held-out half), LF-ViT 83.6% at 33% on that half)
    monkeypatch.setenv("DYNVIT_CACHE", str(tmp_path / "cache"))
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "qs" / "eval" / "metrics.json").read_text())
    stage1, stage2 = (stage["top1"] for stage in metrics["stages"])
    baseline = metrics["baseline"]
    held = metrics["calibration"]["heldout"]
    baseline_held = metrics["calibration"]["baseline_top1"]["heldout"]
    assert baseline["top1"] > 0.7  # the small ViT learns the task
    assert stage2 > stage1 + 0.08  # looking again at the region pays (measured: 14 points)
    assert stage2 > baseline["top1"] - 0.03
    assert held["top1"] > baseline_held - 0.04
    assert held["gflops"] < 0.5 * baseline["gflops"]  # measured: 33%
