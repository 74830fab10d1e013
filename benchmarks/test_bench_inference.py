"""Inference: ``pipe.infer`` at forced exit fractions against the timm forward, same weights and batch.

Group ``infer`` lists them side by side; each LF-ViT entry carries the
expected GFLOPs (fvcore convention) and the speedup those FLOPs predict in
``extra_info``, so measured and predicted ratios can be read together.
"""

from __future__ import annotations

import pytest
import torch
from ratios import forced_infer

from dynvit.flops import count_flops

FRACTIONS = [0.0, 0.5, 0.8, 1.0]


@pytest.fixture(scope="module")
def flops(setup):
    return count_flops(setup.pipe)


@pytest.mark.benchmark(group="infer")
def test_timm_backbone(setup, measure):
    model = setup.pipe.backbone.model
    with torch.no_grad():
        logits = measure(setup.bench.autocasted(lambda: model(setup.images)))
    assert logits.shape == (setup.images.shape[0], setup.pipe.backbone.num_classes)


@pytest.mark.benchmark(group="infer")
@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda f: f"exit{100 * f:.0f}")
def test_lfvit_infer(setup, measure, benchmark, flops, fraction):
    pipe, images = setup.pipe, setup.images
    benchmark.extra_info.update(
        exit_fraction=fraction,
        gflops=round(flops.expected(fraction), 3),
        flops_predicted_speedup=round(flops.full_resolution / flops.expected(fraction), 3),
    )
    with torch.no_grad():
        result = measure(setup.bench.autocasted(lambda: forced_infer(pipe, images, fraction)))
    assert (result.exit_stage == 1).sum().item() == round(fraction * images.shape[0])
