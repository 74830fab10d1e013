"""CF-ViT and DVT train end to end on the embedded data and evaluate (short runs: they need not be good)."""

from __future__ import annotations

import json
import math

import pytest

from dynvit.cli import main

SHORT = ["train.epochs=1", "train.full_image_epochs=0", "train.init_backbone=null", "data.num_workers=0"]
SMALL_DATA = ["data.train_limit=256", "data.val_limit=64"]


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "stages"), [("quickstart_cfvit", 2), ("quickstart_dvt", 3)])
def test_method_trains_and_evaluates_on_the_embedded_data(tmp_path, monkeypatch, recipe, stages):
    monkeypatch.setenv("DYNVIT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / recipe
    overrides = [*SHORT, *SMALL_DATA, f"train.output_dir={run}"]
    assert main(["train", recipe, *overrides]) == 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    # every stage was validated on its own, each as a fraction
    assert [k for k in history[0] if k.startswith("val_acc_stage")] == [f"val_acc_stage{i + 1}" for i in range(stages)]
    assert all(0.0 <= history[0][f"val_acc_stage{i + 1}"] <= 1.0 for i in range(stages))
    out = tmp_path / "eval"
    assert main(["eval", recipe, *SMALL_DATA, "--checkpoint", str(run), "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["stages"]) == stages
    gflops = [stage["gflops"] for stage in metrics["stages"]]
    assert gflops == sorted(gflops) and gflops[0] > 0  # each stage costs more than the one before
    assert (out / "curve.png").is_file()
